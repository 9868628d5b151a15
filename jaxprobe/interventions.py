"""Interventions on a pipeline's sites, compiled into the capture program (see jaxprobe.pipeline.interventions).

    from jaxprobe.interventions import Steer, Patch, Ablate, Scale, ClampSAE
    images = pipe.generate(prompts, interventions=[Steer("unet.mid_block", direction, scale=4.0)])
"""

from jaxprobe.pipeline.interventions import Ablate, ClampSAE, Intervention, Patch, SAEWeights, Scale, Steer

__all__ = ["Steer", "Patch", "Ablate", "Scale", "ClampSAE", "SAEWeights", "Intervention"]
