"""The pipeline's stages as Prefect tasks: each runs one `lora-moe` command as a child process with
one `--config` file, over refs fetched and verified from the artifact store.

    prefect_tasks.py  one task per stage (synth-data ... register), what each hands the next
    runner.py         what every stage task does: fetch inputs, run the command, store, track
    launcher.py       the child process: its command line, logs, timeout, stop on cancel
    caching.py        the stage cache keys and Prefect result storage in the artifact store
    lock.py           one run at a time per stage work folder
"""
