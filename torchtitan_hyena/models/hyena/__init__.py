"""StripedHyena 2: the TrainSpec, registered as ``hyena`` (flavors in ``flavors.py``)."""

from torchtitan_hyena.models.hyena.activations import hyena_activations
from torchtitan_hyena.models.hyena.flavors import hyena_flavors
from torchtitan_hyena.models.hyena.from_llama import HybridFromLlama
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.hyena.parallelize import HYENA_PLAN, validate_hyena_parallelism
from torchtitan_hyena.models.hyena.state_dict_adapter import VortexAdapter
from torchtitan_hyena.models.hyena.traffic import hyena_traffic
from torchtitan_hyena.protocols.train_spec import TrainSpec, register_train_spec

register_train_spec(
    TrainSpec(
        name="hyena",
        model_cls=StripedHyena,
        model_args=hyena_flavors,
        state_dict_adapters={
            "vortex": VortexAdapter,  # Evo 2 checkpoints (evo2_to_dcp.py, dcp_to_evo2.py)
            "llama3": HybridFromLlama,  # a hybrid seeded from a Llama 3 checkpoint (llama_to_dcp.py --target hyena)
        },
        parallelize_plan=HYENA_PLAN,
        validate_fn=validate_hyena_parallelism,
        activation_estimator=hyena_activations,
        traffic_estimator=hyena_traffic,
    )
)
