"""python generate.py task=cat2dog [model=sd14|sd15|sd21|tiny|toy] [source=synthetic|folder|shards] [num_pairs=N]
                   [out_dir=DIR] [devices=auto|N] [worker.rank=R worker.count=N] [verify=true]

pix2pix-zero pairs as webdataset shards in DIR/shards/, resumable: rerun the same command after a kill.
On SLURM: python generate.py -m hydra/launcher=slurm worker.count=N 'worker.rank=range(N)' ...
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import datagen.config  # noqa: F401  (registers the ${repo:...} resolver)

CONF = Path(__file__).resolve().parent / "conf"


def unknown_choice(overrides: list[str]) -> str | None:
    """A readable line for `group=name` naming no conf/group/name.yaml, before Hydra's longer report."""
    for override in overrides:
        group, sep, choice = override.partition("=")
        if not sep or "/" in group or not (CONF / group).is_dir() or any(c in choice for c in ",()[]*"):
            continue  # not one of our config groups, or a sweep: Hydra reports those itself
        if not (CONF / group / f"{choice}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
            return f"unknown {group} '{choice}' (choose from: {known})"
    return None


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import diffusers
    import transformers

    from datagen.launch import main as generate  # heavy imports only once the command line is known good

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    code = generate(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    error = unknown_choice(sys.argv[1:])
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
