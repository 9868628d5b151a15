"""`jaxprobe run`, `probe`, `report` and `steer`: probing against human norms (studies.norms_probing, probes/).

cli/__init__.py registers these commands; each imports what it runs inside its body, so `--help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer



def probe(
    features: Annotated[Path, typer.Option("--features", "-f", help=".npz, .npy, or a folder of <site>.npy")],
    targets: Annotated[Path, typer.Option("--targets", "-t", help="CSV/TSV: a concept column, one column per target")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output table (.parquet and .csv written side by side)")],
    outer_cv: Annotated[int, typer.Option()] = 5,
    inner_cv: Annotated[str, typer.Option(help="folds, or 'loo'")] = "5",
    n_permutations: Annotated[int, typer.Option()] = 0,
    n_bootstrap: Annotated[int, typer.Option()] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    concept_column: Annotated[Optional[str], typer.Option(help="targets column naming each row's concept "
                                                          "(default: 'concept', else the first column)")] = None,
    group_column: Annotated[Optional[str], typer.Option(help="targets column of concept groups kept on one side of "
                                                        "every split (a label, not a target)")] = None,
    concepts: Annotated[Optional[Path], typer.Option("--concepts", help="text file, the concept of each feature "
                                                     "row, one per line (instead of the features' own)")] = None,
    assume_same_order: Annotated[bool, typer.Option("--assume-same-order", help="features that name no concepts: "
                                                    "pair feature row i with targets row i")] = False,
) -> None:
    """Nested cross-validated ridge probes for every feature set x target, as a tidy table.

    Feature rows are matched to targets rows by concept, never silently by position: by --concepts,
    else the features' own concepts (.npz "concepts", concepts.txt from `extract --concepts`), else
    the prompts of extract's manifest.json matched by exact text to the concept column (so prompts
    like "a photo of a dog" need --concepts). Repeated or unmatched concepts are an error.

    Example: jaxprobe probe -f feats/ -t ratings.csv -o probes.parquet --n-permutations 100
    """
    from jaxprobe.probes import run_probe_files

    table = run_probe_files(features, targets, out, outer_cv=outer_cv,
                            inner_cv=inner_cv if inner_cv == "loo" else int(inner_cv),
                            n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed,
                            concept_column=concept_column, group_column=group_column, concepts=concepts,
                            assume_same_order=assume_same_order, log=typer.echo)
    if table is not None:
        typer.echo(f"wrote {len(table)} rows to {out}")


def run(
    config: Annotated[Optional[Path], typer.Argument(help="TOML file with any ExperimentConfig field")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="'tiny' (default), a folder or a cached model id")] = None,
    norms: Annotated[Optional[str], typer.Option(help="binder|mcrae|things|things66|concreteness or a CSV/TSV path")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="results folder")] = None,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps")] = None,
    max_concepts: Annotated[Optional[int], typer.Option(help="only the first N concepts")] = None,
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint: probe image embeddings too")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or bfloat16")] = None,
    model_config: Annotated[Optional[str], typer.Option("--model-config", help="for a single-file checkpoint: the "
                                                        "diffusers folder or cached id whose configs to use")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", metavar="FILE[:SCALE]", help="LoRA file merged at load, FILE or FILE:SCALE "
                                                      "(repeatable)")] = None,
    shard: Annotated[Optional[str], typer.Option(help="params over the devices when one cannot hold them: fsdp|tensor "
                                                 "(default: a replica on each)")] = None,
    force: Annotated[bool, typer.Option("--force", help="recompute cached features, and replace results of other "
                                        "settings in --out")] = False,
) -> None:
    """The whole experiment: features at every text layer and UNet site x step, probes, analyses, report.

    With no config and no model it runs the quick look (the bundled config quick_look.toml: the random
    tiny model on Binder's concrete nouns, 10 steps, 20 permutations; a few minutes on 2 CPU cores);
    otherwise every setting not given takes ExperimentConfig's defaults. The settings in force are printed
    first. Example: jaxprobe run --model runwayml/stable-diffusion-v1-5 --out runs/sd15
    """
    from jaxprobe.studies.norms_probing.experiment import QUICK_LOOK, ExperimentConfig, run_experiment

    overrides = {"model": model, "norms": norms, "out": out, "num_inference_steps": steps,
                 "max_concepts": max_concepts, "image_encoder": image_encoder, "dtype": dtype,
                 "model_config": model_config, "lora": tuple(lora) if lora else None, "shard": shard,
                 "force": force or None}
    if config is None and model in (None, "tiny"):
        config = QUICK_LOOK
        typer.echo(f"config: the quick look, {QUICK_LOOK} (pass a TOML file or --model for other settings)")
    if config is not None:
        cfg = ExperimentConfig.from_toml(config, **overrides)
    else:
        typer.echo("config: ExperimentConfig's defaults and the options given")
        cfg = ExperimentConfig.from_mapping({k: v for k, v in overrides.items() if v is not None})
    run_experiment(cfg, log=typer.echo)


def report(results: Annotated[Path, typer.Argument(help="a results folder written by `jaxprobe run`")]) -> None:
    """Re-render figures and report.html from a run's saved tables."""
    from jaxprobe.studies.norms_probing import report as report_module

    path = report_module.rerender(results)
    typer.echo(f"wrote {path}")


def steer(
    probe: Annotated[Path, typer.Option("--probe", help="a results folder written by `jaxprobe run`")],
    site: Annotated[str, typer.Option("--site", "-s", help="a feature set of its probe table, e.g. unet.mid_block@3")],
    attribute: Annotated[list[str], typer.Option("--attribute", "-a", metavar="NAME", help="a norms attribute (repeatable)")],
    scales: Annotated[str, typer.Option(help="scales in concept std along the probe, e.g. '0,2,4,8' (0: the "
                                        "baseline)")] = "0,2,4,8",
    steps: Annotated[Optional[str], typer.Option(help="steps it is added at, e.g. '3' or '0:10' (default: the "
                                                 "site's own step)")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="prompts to steer, one per line "
                                                    "(default: the run's first --n-prompts concepts)")] = None,
    n_prompts: Annotated[int, typer.Option(help="concepts steered without --prompts")] = 8,
    readout: Annotated[Optional[str], typer.Option(help="the later feature set the probe is read at (default: "
                                                   "the site at the last step, else the next site)")] = None,
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint, when the run had none: "
                                                         "read the attribute from the images too")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: "
                                                "PROBE/steer/SITE/ATTRIBUTES)")] = None,
) -> None:
    """Steer generation along attributes' probe directions: dose-response in a later site and the images.

    Example: jaxprobe steer --probe runs/sd15 --site unet.mid_block@10 --attribute Happy --scales 0,2,4,8
    """
    from jaxprobe.cli import numbers, step_list
    from jaxprobe.studies.norms_probing.steer import probe_steer

    path = probe_steer(probe, site, attribute, scales=numbers(scales, "--scales"), steps=step_list(steps),
                       prompts=prompts, n_prompts=n_prompts, readout=readout, image_encoder=image_encoder, out=out,
                       log=typer.echo)
    typer.echo(f"wrote {path}")
