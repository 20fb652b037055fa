"""The file-safety floor: nothing is half-written, nothing is read unchecked.

atomic.py            write to a temporary file, fsync, rename (files and folders)
output_paths.py      claim an output before writing it; replace only what this tool wrote
output_lock.py       an exclusive lock on an output, with its owner recorded
input_paths.py       the check of every path a user gives (exists, readable, a file or folder)
safetensors_file.py  safetensors headers read and checked without loading tensors
hashing.py           sha256 of files and folders (provenance, cache keys)
"""
