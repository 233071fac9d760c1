"""Typed specs for everything users write (YAML job files, CLI flags): one base (`Spec`: unknown keys and bad
values rejected), the parts several jobs share (common.py), one module per job kind, one way to read a file
(`load_yaml`: untrusted YAML, one-line errors) and to validate a mapping (`parse`).

    base.py          Spec, parse, safe_yaml, read_yaml, load_yaml
    common.py        prompts, CLT choice, resources, storage, commit rounds
    attribution.py   attribution, pruning, the sweep's perturbation plan (and its plugin allow-list)
    intervention.py  interventions on features and splice modes (ct-ray perturb, validation)
    train.py         harvest, CLT shape, optimiser, training
    sweep.py         sweeps (and the graph-job part the retraining canary shares)
    retrain.py       nightly retraining;  features.py  feature dashboards;  quickstart.py  the embedded demo
"""

from .attribution import PLUGINS_ENV, AttributionSpec, PerturbationPlan, PlannedIntervention, PruneSpec, plugin_modules
from .base import MAX_SPEC_BYTES, Spec, first_error, load_yaml, parse, read_yaml, safe_yaml
from .common import CLTChoice, CommitSpec, PromptEntry, PromptFile, RandomCLTSpec, ResourceSpec, StorageSpec
from .features import FeaturesSpec
from .quickstart import QuickstartSpec
from .retrain import CanarySpec, EvalSetSpec, MarginsSpec, RetrainSpec
from .sweep import GraphJobSpec, SweepSpec, load_sweep_spec, parse_sweep_spec
from .train import CLTShapeSpec, HarvestSpec, OptimSpec, TrainSpec

# the optional top-level `kind:` of a spec file (what `ct-ray submit` runs it as) and the spec it names
SPEC_KINDS: dict[str, type[Spec]] = {"harvest": HarvestSpec, "train": TrainSpec, "sweep": SweepSpec,
                                     "retrain": RetrainSpec, "demo": QuickstartSpec, "features": FeaturesSpec}

__all__ = ["Spec", "parse", "first_error", "safe_yaml", "read_yaml", "load_yaml", "MAX_SPEC_BYTES", "SPEC_KINDS",
           "AttributionSpec", "PruneSpec", "PlannedIntervention", "PerturbationPlan", "PLUGINS_ENV", "plugin_modules",
           "CLTChoice", "CommitSpec", "PromptEntry", "PromptFile", "RandomCLTSpec", "ResourceSpec", "StorageSpec",
           "QuickstartSpec", "FeaturesSpec", "CanarySpec", "EvalSetSpec", "MarginsSpec", "RetrainSpec",
           "GraphJobSpec", "SweepSpec", "load_sweep_spec", "parse_sweep_spec", "CLTShapeSpec", "HarvestSpec",
           "OptimSpec", "TrainSpec"]
