"""TopK sparse autoencoders on captured features: one per (site, timestep), trained at once under vmap.

    from jaxprobe.sae import SAEConfig, train_saes, load_saes, inspect_saes
    saes = train_saes(feats, SAEConfig(k=32, expansion=64, steps=5000), out="runs/sae")
    inspect_saes(saes, feats, "runs/sae/inspect", labels=prompts, norms=load_norms("binder"))
"""

from jaxprobe.sae.curves import training_curves, training_curves_per_sae
from jaxprobe.sae.inspect import inspect_saes, latent_table, sae_page
from jaxprobe.sae.model import SAEConfig, TrainState
from jaxprobe.sae.train import SAEs, as_source, evaluate, latent_statistics, load_saes, train_saes

__all__ = ["SAEConfig", "SAEs", "TrainState", "as_source", "evaluate", "inspect_saes", "latent_statistics",
           "latent_table", "load_saes", "sae_page", "train_saes", "training_curves",
           "training_curves_per_sae"]
