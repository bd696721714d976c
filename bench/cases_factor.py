"""basisconv and lowrank: the data-aware factorization (whitened SVD + sequential refit) beside
the same ranks from a plain, data-free SVD (``whiten=false, refit=false, alloc=data``: ranks are
allocated from the same calibration statistics, only the factors ignore the data)."""

from common import Case

PLAIN = {"whiten": False, "refit": False, "alloc": "data"}

CASES = [
    Case("cnn_plain", ["basisconv"], "basisconv flops 0.6", target_flops=0.6),
    Case("cnn_plain", ["basisconv"], "basisconv flops 0.6 plain SVD", {"basisconv": PLAIN}, target_flops=0.6),
    Case("mlp", ["lowrank"], "lowrank params 0.3", target_params=0.3),
    Case("mlp", ["lowrank"], "lowrank params 0.3 plain SVD", {"lowrank": PLAIN}, target_params=0.3),
    Case("transformer", ["lowrank"], "lowrank params 0.5", target_params=0.5),
    Case("transformer", ["lowrank"], "lowrank params 0.5 plain SVD", {"lowrank": PLAIN}, target_params=0.5),
    # tighter budgets, where the data matters most
    Case("cnn_plain", ["basisconv"], "basisconv flops 0.4", target_flops=0.4),
    Case("cnn_plain", ["basisconv"], "basisconv flops 0.4 plain SVD", {"basisconv": PLAIN}, target_flops=0.4),
    Case("mlp", ["lowrank"], "lowrank params 0.1", target_params=0.1),
    Case("mlp", ["lowrank"], "lowrank params 0.1 plain SVD", {"lowrank": PLAIN}, target_params=0.1),
    Case("cnn_plain", ["lowrank"], "lowrank conv=true flops 0.6", {"lowrank": {"conv": True}}, target_flops=0.6),
    Case("cnn_plain", ["pfa", "basisconv"], "pfa,basisconv flops 0.4", target_flops=0.4),
]
