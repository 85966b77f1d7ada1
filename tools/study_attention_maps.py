"""Study: what the cross-attention attends to: each attribute word's attention map over the image, step by step.

    python tools/study_attention_maps.py --model demo-out/model     # docs/images/study_attention_maps.{png,md}

Shapes: B images (one per prompt, seed 0), T text tokens (the tokenizer's model_max_length), H heads,
Dh head width, Tq = h w latent positions of one U-Net resolution, K steps; q (B, H, Tq, Dh),
k (B, H, T, Dh), probabilities P (B, H, Tq, T); a word's map (h, w).

In each cross-attention layer (``attn2`` of every transformer block) the image position i attends to
text token j with probability P[i, j] = softmax_j(q_i . k_j / sqrt(Dh)). Here q = to_q(x) and k =
to_k(context) are captured with the opt-in recorder (npdiffusion/nn/recorder.py, recording only the
``attn2`` modules) during an ordinary pipeline run, and P is recomputed from them (the U-Net passes no
attention mask, so this is exactly the layer's softmax). A word's map at one step is P[:, token]
averaged over the heads and over the cross-attention layers at the chosen resolution (default: the
finest one, Tq largest), reshaped to (h, w); words of several tokens sum their tokens' columns.
With classifier-free guidance the conditional half of the batch is used.

Words come from the prompt through the model's tokenizer: each word is tokenized alone and matched to
its run of ids in the prompt's ids (after the start token), so "top left" gives a row for "top" and
a row for "left" (each an attribute word: colour, shape and position words; "a", "in", "the" are not).

Figure: for each prompt one row per attribute word, one column per denoising step (t shown), and a
last column with the final image; each row's maps share one colour scale (black = the row's smallest
probability, white = its largest; the table gives the absolute comparison). Table: for each word and step, the *object lift*: the map's mean over the
final image's object (pixels brighter than half scale, averaged down to the latent grid) divided by
its mean over the whole image (1 = no preference, > 1 = the word looks at the object).
"""
from __future__ import annotations

import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

PROMPTS = ["a red circle in the top left", "a blue square in the bottom right", "a green triangle in the center"]
STEPS = 10


def parse(argv):
    p = sc.add_common_args(__doc__.splitlines()[0], "docs/images/study_attention_maps.png")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a shapes caption to show (repeatable; default three fixed captions; --quick one)")
    p.add_argument("--steps", type=sc.positive_int, default=None, help=f"denoising steps (default {STEPS}; --quick 3)")
    p.add_argument("--guidance", type=float, default=sc.GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {sc.GUIDANCE_SCALE}, the demo's)")
    p.add_argument("--resolution", type=sc.positive_int, default=None,
                   help="latent side whose cross-attention layers are averaged (default: the finest)")
    args = p.parse_args(argv)
    if args.prompts is not None or args.seeds is not None:
        p.error("--prompts/--seeds do not apply here: name the captions with --prompt TEXT (seed 0 each)")
    return args


def word_tokens(tokenizer, prompt: str) -> list:
    """[(word, [positions in the padded ids])] for each whitespace word of ``prompt``.

    Position 0 is the start token, so the prompt's first content token is at 1. Raises StudyError when
    the words' own tokenizations do not concatenate to the prompt's (then tokens cannot be assigned).
    """
    ids = list(tokenizer.tokenize_ids(prompt))
    out, pos = [], 0
    for word in prompt.split():
        piece = list(tokenizer.tokenize_ids(word))
        if ids[pos:pos + len(piece)] != piece:
            raise sc.StudyError(f"cannot map the tokens of {prompt!r} to its words: {word!r} tokenizes to {piece}, "
                                f"but the prompt has {ids[pos:pos + len(piece)]} there")
        out.append((word, [1 + pos + k for k in range(len(piece))]))
        pos += len(piece)
    return out


def attribute_words(prompt: str) -> list:
    """The colour, shape and position words of a shapes caption, in order (e.g. red, circle, top, left)."""
    from npdiffusion.evaluation.shape_attributes import parse_prompt  # noqa: PLC0415

    color, shape, position = parse_prompt(prompt)
    return [color, shape, *position.split()]


def attention_probs(q, k, heads: int):
    """q (B, Tq, H Dh), k (B, T, H Dh) -> P (B, H, Tq, T) = softmax(q k^T / sqrt(Dh)) over T (float64)."""
    b, tq, hd = q.shape
    dh = hd // heads
    qh = q.reshape(b, tq, heads, dh).transpose(0, 2, 1, 3).astype(numpy.float64)
    kh = k.reshape(b, k.shape[1], heads, dh).transpose(0, 2, 1, 3).astype(numpy.float64)
    s = qh @ kh.transpose(0, 1, 3, 2) / numpy.sqrt(dh)
    s -= s.max(axis=-1, keepdims=True)
    e = numpy.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def object_lift(maps, images) -> numpy.ndarray:
    """maps (B, ..., h, w), images uint8 (B, S, S, 3) -> (B, ...): mean of the map over the object
    (pixels with max channel > 127, as a fraction per latent cell) / mean over the image; NaN if no object."""
    b, s = images.shape[0], images.shape[1]
    h = maps.shape[-1]
    fg = (images.max(axis=-1) > 127).astype(numpy.float64)                          # (B, S, S)
    frac = fg.reshape(b, h, s // h, h, s // h).mean(axis=(2, 4))                     # (B, h, h)
    frac = frac.reshape((b,) + (1,) * (maps.ndim - 3) + (h, h))
    with numpy.errstate(invalid="ignore", divide="ignore"):
        on_object = (maps * frac).sum(axis=(-2, -1)) / frac.sum(axis=(-2, -1))
        return on_object / maps.mean(axis=(-2, -1))


def capture(pipe, prompts, steps: int, guidance: float, resolution):
    """(maps (B, K, T, h, w) float64, timesteps (K,), images uint8 (B, S, S, 3)) for ``prompts``, seed 0."""
    from npdiffusion.nn.module import ModuleList  # noqa: PLC0415
    from npdiffusion.nn.recorder import record  # noqa: PLC0415

    names = [n for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    if not names:
        raise sc.StudyError("the model's U-Net has no cross-attention (attn2) layers")
    layers = dict(pipe.unet.named_modules())
    root = ModuleList([layers[n] for n in names])        # record only these: keys "0.to_q", "0.to_q#1", ...
    with record(root, params=False) as rec:
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, seed=[0] * len(prompts),
                   output_type="np", progress=False)
    images = (numpy.clip(out.images, 0, 1) * 255).round().astype(numpy.uint8)
    calls = len(pipe.scheduler.timesteps)
    b = len(prompts)
    per_layer = {}
    for i, n in enumerate(names):
        mats = []
        for c in range(calls):
            suffix = "" if c == 0 else f"#{c}"
            q = rec.forward[f"act/{i}.to_q{suffix}/output"][-b:]             # conditional half
            k = rec.forward[f"act/{i}.to_k{suffix}/output"][-b:]
            mats.append(attention_probs(q, k, layers[n].heads).mean(axis=1))  # (B, Tq, T)
        per_layer[n] = numpy.stack(mats, axis=1)                               # (B, K, Tq, T)
    sides = {n: int(round(numpy.sqrt(p.shape[2]))) for n, p in per_layer.items()}
    side = resolution or max(sides.values())
    chosen = [n for n in names if sides[n] == side]
    if not chosen:
        raise sc.StudyError(f"--resolution {side}: the cross-attention layers work at sides {sorted(set(sides.values()))}")
    p = numpy.mean([per_layer[n] for n in chosen], axis=0)                     # (B, K, Tq, T)
    maps = p.transpose(0, 1, 3, 2).reshape(b, calls, p.shape[3], side, side)   # (B, K, T, h, w)
    return maps, numpy.asarray(pipe.scheduler.timesteps), images, chosen


def heat_tile(m, vmin: float, vmax: float, px: int = 64):
    """A (h, w) map as a PIL tile: ``vmin`` black -> red -> yellow -> white at ``vmax``, nearest-upscaled."""
    from PIL import Image  # noqa: PLC0415

    v = numpy.clip((m - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = numpy.stack([numpy.clip(3 * v, 0, 1), numpy.clip(3 * v - 1, 0, 1), numpy.clip(3 * v - 2, 0, 1)], -1)
    return Image.fromarray((rgb * 255).round().astype(numpy.uint8)).resize((px, px), Image.NEAREST)


def run(argv=None) -> dict:
    """Run the study; returns {"maps", "timesteps", "images", "layers", "words" (per prompt), "rows" (the table)}."""
    from PIL import Image  # noqa: PLC0415

    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415

    args = parse(argv)
    png, md = sc.out_paths(args.out)
    prompts = args.prompt or (PROMPTS[:1] if args.quick else PROMPTS)
    for p in prompts:
        try:
            attribute_words(p)
        except ValueError as exc:
            raise sc.StudyError(f"--prompt: {exc}") from None
    steps = args.steps or (3 if args.quick else STEPS)
    pipe = sc.load_pipeline(args.model)
    maps, timesteps, images, chosen = capture(pipe, prompts, steps, args.guidance, args.resolution)
    tiles, labels, rows, words_of = [], [], [], []
    for b, prompt in enumerate(prompts):
        toks = dict(word_tokens(pipe.tokenizer, prompt))
        words = attribute_words(prompt)
        words_of.append(words)
        for w in words:
            wm = maps[b][:, toks[w]].sum(axis=1)                                # (K, h, w)
            vmin, vmax = float(wm.min()), float(wm.max())
            for k in range(len(timesteps)):
                tiles.append(heat_tile(wm[k], vmin, vmax))
                labels.append(f"'{w}' t={int(timesteps[k])}")
            tiles.append(Image.fromarray(images[b]).resize((64, 64), Image.NEAREST))
            labels.append(prompt)
            lw = object_lift(wm[None], images[b:b + 1])[0]                      # (K,)
            rows.append([prompt, w] + [f"{v:.2f}" for v in lw])
    grid = image_grid(tiles, labels, cols=len(timesteps) + 1, min_tile=64, font_size=10, max_label_lines=2)
    headers = ["prompt", "word"] + [f"t={int(t)}" for t in timesteps]
    notes = (f"Object lift of each attribute word's cross-attention map (mean over the final image's object / mean "
             f"over the image; 1 = no preference), {steps} steps of {type(pipe.scheduler).__name__}, guidance "
             f"{args.guidance:g}, seed 0, maps averaged over heads and the layers {', '.join(chosen)} "
             f"({maps.shape[-1]}x{maps.shape[-1]}); model {args.model}.")
    sc.write_table(md, "What the cross-attention attends to", sc.markdown_table(headers, rows), notes)
    sc.save_figure(grid, png)
    return {"maps": maps, "timesteps": timesteps, "images": images, "layers": chosen, "words": words_of,
            "rows": rows}


def main(argv=None) -> int:
    return sc.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
