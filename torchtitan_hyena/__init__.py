"""torchtitan_hyena: TorchTitan-style training of Llama 3 and StripedHyena 2 models.

Importing the package is cheap on purpose (no torch import): the CLIs answer ``--help``
without paying for torch, and subpackages import what they need.
"""

__version__ = "0.1.0"
