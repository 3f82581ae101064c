"""python export.py ckpt=RUN/checkpoints/last.ckpt out=generator.ts: the EMA generator as a parity-checked
TorchScript file with its metadata inside (see distill/export.py); `dtype=float16`, `onnx=generator.onnx`."""
import logging
import sys

import hydra
from omegaconf import DictConfig

from distill.export import ONNX_OPSET, ExportError, export


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        report = export(cfg.ckpt, cfg.out, dtype=cfg.dtype, device=cfg.device, onnx=cfg.onnx, task=cfg.task)
    except ExportError as error:
        logging.getLogger("pairforge.export").error("%s", error)
        sys.exit(2)
    meta = report.metadata
    print(f"wrote {report.path}: {meta['resolution']}px {meta['dtype']}, task {meta['task']}, "
          f"training config sha256 {meta['training_config_sha256'][:12]}; "
          f"max abs difference to the eager generator {report.max_abs_diff:.3g}"
          + (f" ({report.fp32_max_abs_diff:.3g} to it in float32)" if report.fp32_max_abs_diff is not None else ""))
    if report.onnx_path is not None:
        check = ("not checked (onnxruntime is not installed)" if report.onnx_max_abs_diff is None
                 else f"max abs difference (onnxruntime) {report.onnx_max_abs_diff:.3g}")
        print(f"wrote {report.onnx_path} (ONNX opset {ONNX_OPSET}): {check}")


if __name__ == "__main__":
    main()
