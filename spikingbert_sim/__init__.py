"""spikingbert_sim: simulate and train 1 / 1.58-bit spiking BERT models.

Built on snnTorch and PyTorch, after "Exploring Extreme Quantization in Spiking Language Models"
(Bal, Jiang, Sengupta 2024) and SpikingBERT (Bal & Sengupta, AAAI 2024).
"""

__version__ = "0.1.0"
