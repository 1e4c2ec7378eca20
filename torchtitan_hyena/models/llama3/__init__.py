"""Llama 3: the TrainSpec (flavors in ``flavors.py``)."""

from torchtitan_hyena.models.llama3.activations import llama3_activations
from torchtitan_hyena.models.llama3.flavors import llama3_flavors
from torchtitan_hyena.models.llama3.model import Transformer
from torchtitan_hyena.models.llama3.parallelize import LLAMA3_PLAN, validate_llama_parallelism
from torchtitan_hyena.models.llama3.state_dict_adapter import HFAdapter, MetaAdapter
from torchtitan_hyena.models.llama3.traffic import llama3_traffic
from torchtitan_hyena.protocols.train_spec import TrainSpec, register_train_spec

register_train_spec(
    TrainSpec(
        name="llama3",
        model_cls=Transformer,
        model_args=llama3_flavors,
        state_dict_adapters={"meta": MetaAdapter, "hf": HFAdapter},  # llama_to_dcp.py, dcp_to_llama.py
        parallelize_plan=LLAMA3_PLAN,
        validate_fn=validate_llama_parallelism,
        activation_estimator=llama3_activations,
        traffic_estimator=llama3_traffic,
    )
)
