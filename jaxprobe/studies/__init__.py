"""The three reference studies, side by side; none imports another.

norms_probing       Braunstein, Toneva & Ilg (2025): ridge probes against human semantic norms
revelio             Kim, Thomas & Ghadiyaram (ICCV 2025): classifiers (and SAE pages) on diffusion features
decoding_diffusion  Zeng, Chen & Wong (2024): directions in h-space, associations and biases
"""
