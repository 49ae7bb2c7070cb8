"""Ultralytics' keys as a config file or command line brings them: spelled otherwise here, not used by training (an
Ultralytics args.yaml holds them all), retired, `amp=` (our precision=), and the fraction keys it range-checks."""

from __future__ import annotations

from typing import Any

from yoloscale.errors import UserError, warn

# Ultralytics' keys that are spelled differently here: named in the "unknown key" message (not accepted as aliases).
ULTRALYTICS_SPELLINGS: dict[str, str] = {}
# Ultralytics' amp= is our precision=: True (auto: fp16 on a GPU), False (fp32), or the precision itself
AMP = {True: "", False: "fp32", "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
ULTRALYTICS_FORMS = {"amp": "Ultralytics' AMP switch: True (precision=auto), False (fp32), or fp16/bf16/fp32."}
# Ultralytics' keys that training a detector does not use (what they are for). An Ultralytics args.yaml holds them
# all: in a config file they are ignored with one note; given on the command line, refused with that reason.
_NOT_TRAINING = {
    "its predict and val settings": (
        "conf iou max_det split save_json source vid_stride stream_buffer visualize augment agnostic_nms classes "
        "retina_masks embed show save_frames save_txt save_conf save_crop show_labels show_conf show_boxes "
        "line_width tracker dnn"
    ),
    "its export settings (yoloscale export RUN format=... takes them)": "format optimize dynamic simplify opset workspace nms quantize",
    "other tasks than detection": "overlap_mask mask_ratio pose kobj rle angle dlog dgrad dlam auto_augment erasing dropout",
    "its own run bookkeeping": "mode cfg verbose save profile save_dir",
}
NOT_FOR_TRAINING = {key: why for why, keys in _NOT_TRAINING.items() for key in keys.split()}
CLOSE_SPELLINGS = {"lr": "lr0", "lr_final": "lrf", "img_size": "imgsz", "epoch": "epochs"}  # hints difflib misses

# Keys Ultralytics checks to lie in [0, 1] (its cfg.CFG_FRACTION_KEYS; a test keeps this list complete).
FRACTION_KEYS = (
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_momentum",
    "warmup_bias_lr",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "translate",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
    "cutmix",
    "copy_paste",
    "bgr",
    "fraction",
    "multi_scale",
    "cls_pw",
)


# Keys we no longer have -> (the value that trained as now, why it went). A config.yaml of an earlier run holds them:
# with that value it still loads (resume works); with another the run could not train as asked, so it is refused.
RETIRED = {
    "fused_bn_silu": (False, "its fused BatchNorm+SiLU kernel made the training step slower than eager on a GPU"),
}


def drop_retired(values: dict, where: str) -> dict:
    for key, (same, why) in RETIRED.items():
        if key in values and coerce_bool(values[key]) != same:
            raise UserError(f"{where}: key '{key}' was removed ({why}).")
    return {k: v for k, v in values.items() if k not in RETIRED}


def drop_not_for_training(values: dict, where: str) -> dict:
    """A config file's Ultralytics keys that training does not use (an Ultralytics args.yaml has them all): dropped,
    with one note naming them. `task` must be detection; `project: null` / `name: null` mean our defaults."""
    if values.get("task", "detect") != "detect":
        raise UserError(f"{where}: task={values['task']!r}; yoloscale trains detectors (task: detect).")
    dropped = [k for k in values if k in NOT_FOR_TRAINING]
    if dropped:
        warn(
            f"{where}: {len(dropped)} of Ultralytics' keys that training does not use are ignored: {', '.join(dropped)}"
        )
    nulls = [k for k in ("project", "name") if k in values and values[k] is None]
    dropped = {*NOT_FOR_TRAINING, "task", *nulls}
    return {k: v for k, v in values.items() if k not in dropped}


def ultralytics_forms(values: dict, where: str) -> dict:
    """Ultralytics' amp= becomes precision= (the two given together must agree); device=cpu sets cpu=True."""
    values = dict(values)
    if "amp" in values:
        amp = coerce_bool(values.pop("amp"))
        if amp not in AMP:
            raise UserError(f"{where}: key 'amp' expects True, False, fp16, bf16 or fp32, got {amp!r}.")
        precision = AMP[amp]
        if precision and values.get("precision", "auto") not in ("auto", precision):
            raise UserError(f"{where}: amp={amp} and precision={values['precision']} disagree; give one of them.")
        if precision:
            values["precision"] = precision
    if str(values.get("device", "")).strip().lower() == "cpu":
        values["cpu"] = True
    return values


def coerce_bool(value: Any) -> Any:
    return {"true": True, "false": False}.get(value.strip().lower(), value) if isinstance(value, str) else value
