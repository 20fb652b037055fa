"""MLflow "models from code": MLflow runs this file to build the registered bundle's pyfunc model
(`tasks.registry.versions.save_bundle_model`), instead of unpickling an object. Not imported by the package."""

from mlflow.models import set_model

from tasks.registry.video_model import LoraMoeVideoModel

set_model(LoraMoeVideoModel())
