"""Classification's config schema: every key with its default, and the checks of every value.

No torch at import time: ``hypernorm --help`` and ``load_config`` stay fast.
"""
from __future__ import annotations

from typing import Any

from ..config import expect, flatten, merge_config

__all__ = ["DEFAULT_CONFIG", "RESUMABLE_DIFFERENCES", "validate_config", "resolve_config"]

DEFAULT_CONFIG: dict[str, Any] = {
    "model": {
        "name": "resnet20",  # any name of hypernorm.list_models()
        "norm": "bn",  # bn, bhn, gn, ghn, syncbn, syncbhn, ... (hypernorm.nn.norm_names())
        "num_classes": None,  # null: the data set's class count
        "sync_bn": False,  # convert BatchNorm to SyncBatchNorm (keeps HyperNorm layers) when distributed
    },
    "data": {
        "dataset": "cifar100",  # cifar100 | cifar10 | imagenet
        "root": None,  # null: $HYPERNORM_DATA, else ./data
        "download": True,  # fetch the official CIFAR archives when missing (needs internet)
        "train_subset": None,  # int: a fixed-seed random subset of the train set, for quick runs
        "augment": True,  # crop + flip (CIFAR), random-resized crop + flip (ImageNet)
        "workers": 2,  # DataLoader worker processes per training process
        "test_batch_size": None,  # null: train.batch_size
        "image_size": None,  # ImageNet crop size (null: 224); CIFAR is always 32
        "on_device": None,  # hold the whole split on the training device, crop + flip there (null: CIFAR on CUDA)
    },
    "train": {
        "epochs": 164,
        "batch_size": 128,  # per process; the global batch is batch_size * world size
        "device": "auto",  # auto (CUDA when available) | cpu | cuda
        "threads": None,  # torch CPU threads per process (null: torch's default); 1 avoids collapse on a busy CPU
        "amp": False,  # float16 autocast + GradScaler, CUDA only
        "channels_last": False,
        "grad_clip": None,  # max global L2 norm of the gradients, or null
        "compile": None,  # torch.compile the model (null: where it pays, a HyperNorm network in a long run)
        "cuda_graphs": False,  # replay each training step's forward + backward as a CUDA graph (one GPU, float32)
        "seed": 0,
        "deterministic": False,  # deterministic kernels (slower on CUDA)
        "eval_every": 1,  # evaluate on the test set every N epochs (and always after the last)
        "allow_resize": False,  # resume with another world size or global batch (recorded in summary.json)
        "relay_diagnostics": True,  # relay.csv: h, c of the HyperNorms per epoch (BN: gamma, beta where HN would go)
    },
    "optim": {
        "lr": 0.1,  # for the global batch; not rescaled automatically
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "sched": "step",  # step | cosine
        "warmup_epochs": 0,  # linear warm-up from warmup_start_factor * lr, per iteration
        "warmup_start_factor": 0.1,
        "milestones": [81, 122],  # epochs (step schedule)
        "gamma": 0.1,  # step schedule factor
        "min_lr": 0.0,  # cosine schedule floor
        "label_smoothing": 0.0,
    },
    "output": {
        "dir": "runs/default",  # the run folder: config.yaml, metrics.csv, summary.json, checkpoint.pt
    },
}

# Keys that may differ when a run folder is resumed: where things are and how fast they load, not what is trained.
RESUMABLE_DIFFERENCES = {"data.root", "data.workers", "data.download", "data.test_batch_size", "data.on_device",
                         "output.dir", "train.device", "train.cuda_graphs", "train.compile", "train.threads",
                         "train.allow_resize", "train.relay_diagnostics"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_common(flat: dict[str, Any]) -> None:
    """The keys classification and detection share: device, threads, seed, batch, epochs, clipping, output."""
    expect("train.device", flat["train.device"], flat["train.device"] in ("auto", "cpu", "cuda"),
           "one of auto, cpu, cuda")
    for key in ("train.epochs", "train.batch_size"):
        expect(key, flat[key], _is_int(flat[key]) and flat[key] >= 1, "a positive int")
    threads = flat["train.threads"]
    expect("train.threads", threads, threads is None or (_is_int(threads) and threads >= 1), "a positive int or null")
    expect("train.seed", flat["train.seed"], _is_int(flat["train.seed"]) and flat["train.seed"] >= 0,
           "an int >= 0")
    clip = flat["train.grad_clip"]
    expect("train.grad_clip", clip, clip is None or (_is_number(clip) and clip > 0), "a positive number or null")
    expect("data.workers", flat["data.workers"], _is_int(flat["data.workers"]) and flat["data.workers"] >= 0,
           "an int >= 0")
    expect("output.dir", flat["output.dir"], isinstance(flat["output.dir"], str) and flat["output.dir"].strip() != "",
           "a folder path")
    check_optim(flat, flat["train.epochs"])


def check_optim(flat: dict[str, Any], epochs: int) -> None:
    """SGD and the LR schedule, the same keys for both tasks."""
    expect("optim.lr", flat["optim.lr"], flat["optim.lr"] > 0, "a positive learning rate")
    expect("optim.momentum", flat["optim.momentum"], 0 <= flat["optim.momentum"] < 1, "a number in [0, 1)")
    expect("optim.weight_decay", flat["optim.weight_decay"], flat["optim.weight_decay"] >= 0, "a number >= 0")
    expect("optim.nesterov", flat["optim.nesterov"], not flat["optim.nesterov"] or flat["optim.momentum"] > 0,
           "false when optim.momentum is 0 (Nesterov needs momentum > 0)")
    expect("optim.sched", flat["optim.sched"], flat["optim.sched"] in ("step", "cosine"), "one of step, cosine")
    expect("optim.warmup_start_factor", flat["optim.warmup_start_factor"],
           0 <= flat["optim.warmup_start_factor"] <= 1, "a number in [0, 1]")
    milestones = flat["optim.milestones"]
    expect("optim.milestones", milestones, all(_is_int(m) and m >= 1 for m in milestones)
           and milestones == sorted(set(milestones)), "increasing epoch numbers")
    if flat["optim.sched"] == "step":  # a milestone after the last epoch would silently never apply
        expect("optim.milestones", milestones, all(m < epochs for m in milestones),
               f"epochs before the last (train.epochs={epochs}) for optim.sched=step")
    expect("optim.gamma", flat["optim.gamma"], 0 < flat["optim.gamma"] <= 1, "a number in (0, 1]")
    expect("optim.min_lr", flat["optim.min_lr"], 0 <= flat["optim.min_lr"] <= flat["optim.lr"],
           f"a number in [0, optim.lr={flat['optim.lr']}]")


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check every value a type check alone cannot (choices, ranges, nulls); returns ``config``."""
    from ..models import list_models
    from ..models.external import is_external
    from ..nn import norm_names

    flat = flatten(config)
    check_common(flat)
    expect("model.name", flat["model.name"], flat["model.name"] in list_models() or is_external(flat["model.name"]),
           f"one of {', '.join(list_models())}, or timm/<name> or torchvision/<name>")
    norms = norm_names(ablations=True)
    expect("model.norm", flat["model.norm"], flat["model.norm"] in norms, f"one of {', '.join(norms)}")
    classes = flat["model.num_classes"]
    expect("model.num_classes", classes, classes is None or (_is_int(classes) and classes >= 2),
           "an int >= 2 or null (the data set's class count)")
    expect("data.dataset", flat["data.dataset"], flat["data.dataset"] in ("cifar100", "cifar10", "imagenet"),
           "one of cifar100, cifar10, imagenet")
    expect("data.root", flat["data.root"], flat["data.root"] is None or isinstance(flat["data.root"], str),
           "a folder path or null")
    for key in ("data.train_subset", "data.test_batch_size", "data.image_size"):
        expect(key, flat[key], flat[key] is None or (_is_int(flat[key]) and flat[key] >= 1), "a positive int or null")
    size = flat["data.image_size"]  # CIFAR images are 32x32: another size would be recorded but never used
    expect("data.image_size", size, flat["data.dataset"] == "imagenet" or size in (None, 32),
           f"null for data.dataset={flat['data.dataset']} (CIFAR images are 32x32)")
    expect("data.on_device", flat["data.on_device"], flat["data.on_device"] in (None, True, False)
           and not (flat["data.on_device"] is True and flat["data.dataset"] == "imagenet"),
           "null, true or false (true only for CIFAR, which is held in memory)")
    expect("train.compile", flat["train.compile"], flat["train.compile"] in (None, True, False),
           "true, false or null (compile where it pays)")
    if flat["train.cuda_graphs"]:
        expect("train.cuda_graphs", True, flat["train.device"] != "cpu" and not flat["train.compile"]
               and not flat["train.amp"] and flat["train.grad_clip"] is None,
               "false with train.device=cpu, train.compile, train.amp or train.grad_clip (a CUDA graph replays one "
               "float32 forward + backward on one GPU)")
    expect("train.eval_every", flat["train.eval_every"], flat["train.eval_every"] >= 1, "a positive int")
    epochs = flat["train.epochs"]
    expect("optim.warmup_epochs", flat["optim.warmup_epochs"], 0 <= flat["optim.warmup_epochs"] <= epochs,
           f"a number of epochs in [0, train.epochs={epochs}]")
    expect("optim.label_smoothing", flat["optim.label_smoothing"], 0 <= flat["optim.label_smoothing"] < 1,
           "a number in [0, 1)")
    return config


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config ``train`` really uses: ``config`` (a partial dict is fine) over the defaults, validated."""
    return validate_config(merge_config(DEFAULT_CONFIG, config, defaults=DEFAULT_CONFIG))
