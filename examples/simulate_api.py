"""Simulate a spiking BERT from Python: convert the offline MiniLM, run T steps, plot Fig. 2a.

    python examples/simulate_api.py --out figures/example

Shows the three objects a user works with: the model, `simulate` and its `SimulationResult`.
"""

import argparse
from pathlib import Path

import matplotlib.pyplot as plt

from spikingbert_sim.hf import convert_from_hf, load_tokenizer
from spikingbert_sim.plotting import plot_layer_convergence, plot_raster, save_figure
from spikingbert_sim.simulation import RecordOptions, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=80)
    parser.add_argument("--weights", choices=["fp", "binary", "ternary"], default="ternary")
    parser.add_argument("--out", default="figures/example")
    args = parser.parse_args()

    model = convert_from_hf(None, num_layers=4, weight_mode=args.weights)  # offline MiniLM, first 4 layers
    tokenizer = load_tokenizer(None)
    batch = tokenizer(["the film is a delight from start to finish", "a tedious, joyless slog"],
                      padding=True, return_tensors="pt")
    result = simulate(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                      timesteps=args.timesteps, record=RecordOptions(raster_sites=(model.output_site,)))

    for site, steps in result.settling_steps().items():
        print(f"{site:<28} final ASR {float(result.asr_trace[site][-1]):.4f}  settled at t={steps}")

    out = Path(args.out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_layer_convergence(ax1, result.asr_trace, model.layer_output_sites())
    plot_raster(ax2, result.rasters[model.output_site][:, 0, 0, :], title="last layer, [CLS], sequence 0")
    print("wrote", save_figure(fig, out / "example.png"))


if __name__ == "__main__":
    main()
