"""MLflow: the runs a pipeline tracks and the model registry it writes.

tracking.py                      the parent run and one nested run per stage
versions.py                      registered versions, aliases (candidate, champion), bundles
card.py                          a version's model card and description
bundle.py                        a registered model as verified local files (`generate --model`)
video_model.py, video_model_code.py  the pyfunc model (models from code, nothing pickled)
cli.py                           `lora-moe registry list|show|promote` (a CLI plugin)
"""
