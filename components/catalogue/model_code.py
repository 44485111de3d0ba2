"""Model-from-code entry point MLflow runs when it loads the alignsearch pyfunc."""

from mlflow.models import set_model

from components.catalogue.pyfunc import AlignSearchModel

set_model(AlignSearchModel())
