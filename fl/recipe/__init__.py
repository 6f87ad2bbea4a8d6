"""The Recipe API (FLARE's ``nvflare.recipe``): an algorithm's job from a few arguments, run in an environment.

recipe = FedAvgRecipe(name="hello-pt", min_clients=2, num_rounds=2, model=SimpleNetwork(),
                      train_script="client.py", train_args="--epochs 1")
add_experiment_tracking(recipe, tracking_type="tensorboard")
run = recipe.execute(SimEnv(num_clients=2))      # or PocEnv(num_clients=2), ProdEnv(startup_kit=...)
run.get_status(), run.get_result()
"""

from fl.recipe.env import PocEnv, ProdEnv, Run, SimEnv
from fl.recipe.fedavg import (
    CyclicRecipe,
    FedAvgRecipe,
    FedOptRecipe,
    FedProxRecipe,
    NumpyFedAvgRecipe,
    ScaffoldRecipe,
)
from fl.recipe.fedeval import FedEvalRecipe
from fl.recipe.spec import Recipe
from fl.recipe.utils import add_cross_site_evaluation, add_experiment_tracking

__all__ = [
    "CyclicRecipe",
    "FedAvgRecipe",
    "FedEvalRecipe",
    "FedOptRecipe",
    "FedProxRecipe",
    "NumpyFedAvgRecipe",
    "PocEnv",
    "ProdEnv",
    "Recipe",
    "Run",
    "ScaffoldRecipe",
    "SimEnv",
    "add_cross_site_evaluation",
    "add_experiment_tracking",
]
