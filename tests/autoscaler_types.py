"""Two instance types with simple step-time models, shared by the autoscaler's unit tests."""

from splitserve.autoscaler.catalog import Catalog, InstanceType, PrefillModel, StepModel

SMALL = InstanceType("small", 0.10, PrefillModel(0.01, 0.001, 0.0), StepModel(0.02, 0.001, 1e-6),
                     kv_tokens=32768, max_batch=32)
BIG = InstanceType("big", 0.25, PrefillModel(0.005, 0.0004, 0.0), StepModel(0.01, 0.0005, 5e-7),
                   kv_tokens=65536, max_batch=64)
CATALOG = Catalog([SMALL, BIG])
