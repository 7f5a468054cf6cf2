"""The GPU check's plans: which rows each step measures, at what size, and the time each step is given.

``gpu`` is the run for a lent H100 / H200 (its shares add up to more than one 10-minute device call,
so the check is spread over calls with ``--steps`` and ``--append``, see ``DEVICE_HELP``); ``cpu`` is
the same plan with tiny sizes, the CI test of the script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEVICE_HELP", "OPTIONAL", "PLANS", "STEPS", "VIEWS", "Plan", "quick"]

STEPS = ("wheels", "env", "tests", "model", "compile", "loader", "e2e", "train")
# Packages the bare GPU machine may lack; each is imported lazily by the code that needs it.
OPTIONAL = ("nvidia.dali", "ffcv", "cv2", "pynvml", "pytest", "tensorboard", "matplotlib", "sklearn", "yaml",
            "tqdm", "psutil", "numba", "PIL")
VIEWS = 2  # one weak + one strong view per image in every bench and training recipe here

DEVICE_HELP = """\
DALI and FFCV on the GPU machine (Python 3.12, no network; neither is on its image):
  1. here:  make gpu-wheels
     (builds FFCV 1.0.2 for CPython 3.12, repaired by auditwheel so it carries libturbojpeg and OpenCV,
     downloads DALI's cp312 wheels, slims them, and packs all into .device/parts/whl.partNN, 60 MiB each,
     listed in .device/CARRY; .device/ is git-ignored)
  2. carry the parts one per device call, naming the file itself (carry: [".device/parts/whl.part00"],
     then part01, ...), each call within the machine's warm window: parts carried earlier stay while
     the machine is warm, and runs/ (where --append finds the earlier steps) stays with them
  3. the wheels step installs them (into --site, default /tmp/site) once every part is there. The plan
     for three parts, one start plus two calls, each command ending in  cp runs/gpucheck/gpucheck.* $OUT/ :
       call 1, part00:  make gpu-check ARGS="--steps env,model,compile --budget-s 300"
       call 2, part01:  make gpu-check ARGS="--steps env,train --append --budget-s 130"
       call 3, part02:  make gpu-check ARGS="--steps wheels,env,tests,loader,e2e --append --budget-s 310"
Without the parts, DALI and FFCV rows are skipped, each with the reason "<backend> not importable here".
A test module that cannot be imported there (a package missing) is listed as "not collected".
"""


@dataclass(frozen=True)
class Plan:
    """Sizes of one plan. ``gpu`` is the issue's run; ``cpu`` the same steps, tiny, for CI."""

    name: str
    device: str
    shares: dict[str, float]  # seconds each step is planned to take; unused time passes to later steps
    num_images: int
    # (label, bench arguments) per model-only row; compile_rows run in the compile step
    model_rows: tuple[tuple[str, tuple[str, ...]], ...]
    compile_rows: tuple[tuple[str, tuple[str, ...]], ...]
    loader_args: tuple[str, ...]  # bench arguments of the loader-only and end-to-end rows
    timing: tuple[str, ...]  # --warmup / --steps / --repeats of every bench call
    train: dict[str, Any]  # config overrides of the training run
    train_steps: int
    resume_steps: int
    backends: str = "all"
    cuda_tests: tuple[str, ...] | None = None  # test files to collect; None = every file with a cuda mark
    skip_compile: str | None = None  # why the torch.compile rows are skipped in this plan, if they are
    install_wheels: bool = True  # False: reassemble and list the carried wheels only (they are for cp312)
    env: dict[str, str] = field(default_factory=dict)  # environment of every command


_GPU_TRAIN = {"backend": "torchvision", "recipe": "stl96", "backbone": "resnet18", "proj_hidden": 2048,
              "proj_dim": 128, "queue_size": 4096, "batch_size": 128, "lr": 0.3, "w_sim": 1.0, "momentum": 0.99,
              "warmup_epochs": 1, "precision": "bf16", "channels_last": True, "log_every": 10, "ckpt_every": 100}
_CPU_TRAIN = {"backend": "torchvision", "recipe": "cifar32", "backbone": "resnet18", "proj_hidden": 64,
              "proj_dim": 32, "queue_size": 16, "batch_size": 8, "lr": 1.0, "w_sim": 1.0, "momentum": 0.99,
              "warmup_epochs": 0, "precision": "no", "channels_last": False, "log_every": 2, "ckpt_every": 10}
_RN50 = ("--model", "resnet50", "--size", "224", "--batch", "256", "--precision", "bf16", "--channels-last")

PLANS: dict[str, Plan] = {
    "gpu": Plan(
        name="gpu", device="cuda", num_images=2048,
        # compile: a cold inductor compile of RN50 forward + backward + the EMA teacher, then the timing
        shares={"wheels": 45, "env": 10, "tests": 75, "model": 60, "compile": 230, "loader": 75, "e2e": 105,
                "train": 120},
        model_rows=(("rn50-224-eager", _RN50),
                    ("rn18cifar-32", ("--model", "resnet18_cifar", "--size", "32", "--batch", "512", "--precision",
                                      "bf16", "--channels-last"))),
        compile_rows=(("rn50-224-compile", (*_RN50, "--compile")),),
        loader_args=_RN50,
        timing=("--warmup", "5", "--steps", "15", "--repeats", "3"),
        train=_GPU_TRAIN, train_steps=200, resume_steps=20,
    ),
    "cpu": Plan(
        name="cpu", device="cpu", num_images=64,
        shares={"wheels": 10, "env": 5, "tests": 35, "model": 50, "compile": 1, "loader": 55, "e2e": 60,
                "train": 50},
        model_rows=(("rn50-16", ("--model", "resnet50", "--size", "16", "--batch", "4", "--precision", "no")),
                    ("rn18cifar-16", ("--model", "resnet18_cifar", "--size", "16", "--batch", "4", "--precision",
                                      "no"))),
        compile_rows=(("rn50-16-compile", ("--model", "resnet50", "--size", "16", "--batch", "4", "--precision",
                                           "no", "--compile")),),
        loader_args=("--model", "resnet18_cifar", "--size", "16", "--batch", "4", "--precision", "no"),
        timing=("--warmup", "1", "--steps", "1", "--repeats", "2"),
        train=_CPU_TRAIN, train_steps=8, resume_steps=2,
        skip_compile="torch.compile rows run in the GPU plan only (inductor compiles for minutes on 2 CPU cores)",
        install_wheels=False,
        # one intra-op thread: on a shared 2-core machine, waiting OpenMP threads made tiny steps ~10x slower
        env={"OMP_NUM_THREADS": "1"},
    ),
}


def quick(plan: Plan) -> Plan:
    """The CPU plan cut to what tests the script in about a minute: one model row, torchvision only."""
    return Plan(**{**plan.__dict__, "name": "cpu-quick", "model_rows": plan.model_rows[-1:],
                   "backends": "torchvision", "cuda_tests": ("tests/test_gpu_augment.py",),
                   "shares": {k: v * 0.6 for k, v in plan.shares.items()}})
