"""Draw docs/images/architecture.png: how data flows through npdiffusion's packages, and how a backward
pass walks back through them (docs/architecture.md).

    python tools/plot_architecture.py [--out docs/images/architecture.png]

Pillow only (no matplotlib): boxes, arrows and text on a canvas drawn at twice the size and scaled
down, so the edges are smooth. Forward is blue, backward red, the frozen / inference-only parts grey.
"""
from __future__ import annotations

import argparse
import math
import os

from PIL import Image, ImageDraw, ImageFont

SCALE = 2                                         # drawing scale before the final down-sampling
WIDTH, HEIGHT = 1800, 1375
FORWARD, BACKWARD, GREY, INK = "#1f5fa8", "#c0392b", "#7f7f7f", "#222222"
FILL = {"data": "#f4f4f4", "frozen": "#eeeeee", "model": "#dde8f6", "math": "#e6f2e1",
        "optim": "#fbe3d6", "layer": "#ffffff", "io": "#f6efd9"}


def _font(size: int, bold: bool = False):
    """Pillow's bundled scalable font (DejaVu Sans where the system has it, for the bold weight)."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(name, size * SCALE)
    except OSError:
        return ImageFont.load_default(size=size * SCALE)


class Canvas:
    def __init__(self):
        self.image = Image.new("RGB", (WIDTH * SCALE, HEIGHT * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image)

    def text(self, x, y, s, size=15, color=INK, bold=False, anchor="la"):
        self.draw.text((x * SCALE, y * SCALE), s, fill=color, font=_font(size, bold), anchor=anchor)

    def box(self, x, y, w, h, title, lines=(), fill="layer", edge=INK, size=14, dashed=False):
        """A rounded box with a bold title and smaller lines under it; returns its anchor points."""
        r = (x * SCALE, y * SCALE, (x + w) * SCALE, (y + h) * SCALE)
        self.draw.rounded_rectangle(r, radius=8 * SCALE, fill=FILL.get(fill, fill), outline=edge,
                                    width=(1 if dashed else 2) * SCALE)
        self.text(x + w / 2, y + 8, title, size=size + 1, bold=True, anchor="ma")
        for i, line in enumerate(lines):
            self.text(x + w / 2, y + 12 + (size + 5) * (i + 1), line, size=size - 1, anchor="ma")
        return {"l": (x, y + h / 2), "r": (x + w, y + h / 2), "t": (x + w / 2, y), "b": (x + w / 2, y + h)}

    def arrow(self, points, color=FORWARD, width=3, label=None, label_at=None, label_size=13):
        pts = [(px * SCALE, py * SCALE) for px, py in points]
        self.draw.line(pts, fill=color, width=width * SCALE, joint="curve")
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        ang = math.atan2(y1 - y0, x1 - x0)
        head = 12 * SCALE
        tip = [(x1, y1),
               (x1 - head * math.cos(ang - 0.4), y1 - head * math.sin(ang - 0.4)),
               (x1 - head * math.cos(ang + 0.4), y1 - head * math.sin(ang + 0.4))]
        self.draw.polygon(tip, fill=color)
        if label:
            lx, ly = label_at if label_at else ((points[0][0] + points[-1][0]) / 2,
                                                (points[0][1] + points[-1][1]) / 2 - 16)
            self.text(lx, ly, label, size=label_size, color=color, anchor="ma")

    def panel(self, y, h, title):
        self.draw.rectangle((12 * SCALE, y * SCALE, (WIDTH - 12) * SCALE, (y + h) * SCALE),
                            outline="#bbbbbb", width=SCALE)
        self.text(26, y + 10, title, size=17, bold=True)

    def save(self, path):
        out = self.image.resize((WIDTH, HEIGHT), Image.LANCZOS)
        out = out.quantize(colors=256, method=Image.Quantize.FASTOCTREE)   # flat colours: a small file
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        out.save(path, optimize=True)


def training_panel(c: Canvas, top: int):
    c.panel(top, 330, "1. One training step (training/unet_stage.py): forward left to right, backward back")
    y = top + 55
    data = c.box(30, y, 170, 110, "data/", ["images (N, S, S, 3)", "captions"], fill="data")
    vae = c.box(250, y - 20, 220, 74, "models/vae  encoder", ["frozen: run once, q(z | x)"],
                fill="frozen", edge=GREY)
    clip = c.box(250, y + 76, 220, 74, "models/clip  text tower", ["frozen: run once, c (B, T, D)"],
                 fill="frozen", edge=GREY)
    qs = c.box(520, y - 20, 260, 74, "diffusion/forward.py", ["q_sample: z_t = a_t z0 + s_t noise"],
               fill="math")
    unet = c.box(840, y + 20, 270, 100, "models/unet", ["UNet2DConditionModel", "(z_t, t, c) -> eps_hat"],
                 fill="model", edge=FORWARD)
    loss = c.box(1180, y + 20, 250, 100, "diffusion/objectives.py", ["loss = mean w (eps_hat - target)^2",
                                                                   "returns dloss / d eps_hat"], fill="math")
    opt = c.box(1500, y + 20, 270, 100, "optim/", ["AdamW.step(): reads every", "parameter's grad; EMA, clip"],
                fill="optim", edge=BACKWARD)
    c.arrow([data["r"], (225, y + 55), (225, vae["l"][1]), vae["l"]], GREY, width=2)
    c.arrow([data["r"], (225, y + 55), (225, clip["l"][1]), clip["l"]], GREY, width=2)
    c.arrow([vae["r"], qs["l"]], FORWARD, label="z0", label_at=(500, vae["r"][1] - 20))
    c.arrow([qs["r"], (805, qs["r"][1]), (805, unet["l"][1] - 20), (unet["l"][0], unet["l"][1] - 20)], FORWARD,
            label="z_t, t", label_at=(805, qs["r"][1] - 22))
    c.arrow([clip["r"], (805, clip["r"][1]), (805, unet["l"][1] + 25), (unet["l"][0], unet["l"][1] + 25)],
            FORWARD, label="c", label_at=(790, clip["r"][1] + 4))
    c.arrow([(unet["r"][0], unet["r"][1] - 22), (loss["l"][0], loss["l"][1] - 22)], FORWARD, label="eps_hat",
            label_at=(1145, unet["r"][1] - 46))
    c.arrow([(loss["l"][0], loss["l"][1] + 22), (unet["r"][0], unet["r"][1] + 22)], BACKWARD,
            label="d eps_hat", label_at=(1145, unet["r"][1] + 28))
    # the backward ends in the parameters' gradients, which the optimizer reads
    by = y + 160
    c.arrow([unet["b"], (unet["b"][0], by), (opt["b"][0], by), opt["b"]], BACKWARD,
            label="unet.backward(d eps_hat): every parameter gets weight.grad (accumulated, +=)",
            label_at=(1270, by + 6))
    c.text(30, top + 272, "Frozen models run in eval() mode (no caches) before the first step; "
           "their outputs are data to the U-Net. The VAE and CLIP stages train their own model the same way "
           "(models/vae/loss.py, models/clip/contrastive.py).", size=13, color=GREY)
    c.text(30, top + 294, "A resumed run is exact: every draw (t, noise, dropout, caption dropout) comes from the "
           "trainer's generator (random/), saved with the weights and optimizer state (training/checkpoint.py).",
           size=13, color=GREY)


def sampling_panel(c: Canvas, top: int):
    c.panel(top, 250, "2. Sampling (pipelines/stable_diffusion.py): forward only, eval() mode, so nothing is cached")
    y = top + 60
    prompt = c.box(30, y, 190, 90, "models/clip", ["tokenizer + text tower", "c_cond, c_uncond (\"\")"],
                   fill="model")
    noise = c.box(30, y + 110, 190, 60, "random/", ["torch-equal noise z_T"], fill="data")
    unet = c.box(330, y + 20, 230, 90, "models/unet", ["eps on [uncond | cond]", "one batch of 2B"], fill="model")
    cfg = c.box(640, y + 20, 260, 90, "classifier-free guidance", ["eps_u + w (eps_c - eps_u)",
                                                                  "(diffusion/guidance.py)"], fill="math")
    sched = c.box(980, y + 20, 250, 90, "schedulers/", ["step(eps, t, z_t) -> z_{t-1}",
                                                       "DDIM, Euler, DPM-Solver++ ..."], fill="math")
    vae = c.box(1330, y + 20, 200, 90, "models/vae", ["decoder: latents -> image"], fill="model")
    img = c.box(1610, y + 30, 160, 70, "image", ["(B, 3, H, W)"], fill="data")
    c.arrow([prompt["r"], (290, prompt["r"][1]), (290, unet["l"][1] - 15), (unet["l"][0], unet["l"][1] - 15)])
    c.arrow([noise["r"], (290, noise["r"][1]), (290, unet["l"][1] + 20), (unet["l"][0], unet["l"][1] + 20)])
    c.arrow([unet["r"], cfg["l"]])
    c.arrow([cfg["r"], sched["l"]])
    loop_y = y + 150
    c.arrow([sched["b"], (sched["b"][0], loop_y), (unet["b"][0], loop_y), unet["b"]],
            label="z_{t-1}: next step, T steps in all", label_at=((sched["b"][0] + unet["b"][0]) / 2, loop_y + 6))
    c.arrow([sched["r"], vae["l"]], label="after the", label_at=(1280, sched["r"][1] + 8))
    c.text(1280, sched["r"][1] + 26, "last step", size=13, color=FORWARD, anchor="ma")
    c.arrow([vae["r"], img["l"]])
    c.text(1330, y + 130, "Guided sampling (guidance/) is the", size=13, color=BACKWARD)
    c.text(1330, y + 148, "exception: it runs a classifier, or the", size=13, color=BACKWARD)
    c.text(1330, y + 166, "VAE decoder + CLIP, backward for d / d z_t.", size=13, color=BACKWARD)


def layers_panel(c: Canvas, top: int):
    c.panel(top, 690, "3. Inside a model: forward calls down the layers, backward walks back up them in reverse")
    x, w = 30, 560
    rows = [
        ("models/  (unet, vae, clip, blocks)", ["UNet2DConditionModel, AutoencoderKL, CLIPTextModel:",
                                                "children called in order; backward calls theirs in reverse"],
         "model"),
        ("nn/  Module protocol (nn/module.py)", ["forward(x): save_for_backward(cache) in train()",
                                                "backward(dy): returns d inputs, weight.grad += dW"], "layer"),
        ("ops/  stateless pairs", ["op_forward(x, W, ...) -> (y, cache)",
                                   "op_backward(dy, cache) -> (dx, dW, db)"], "math"),
        ("backend.py  xp  +  parallel.py", ["NumPy or CuPy arrays; element-wise work", "split over CPU threads"],
         "io"),
    ]
    y = top + 55
    boxes = []
    for title, lines, fill in rows:
        boxes.append(c.box(x, y, w, 92, title, lines, fill=fill, size=14))
        y += 130
    for upper, lower in zip(boxes, boxes[1:]):
        c.arrow([(upper["b"][0] - 90, upper["b"][1]), (lower["t"][0] - 90, lower["t"][1])], FORWARD)
        c.arrow([(lower["t"][0] + 90, lower["t"][1]), (upper["b"][0] + 90, upper["b"][1])], BACKWARD)
    c.text(x + w / 2 - 100, boxes[0]["b"][1] + 8, "forward", size=13, color=FORWARD, anchor="ra")
    c.text(x + w / 2 + 100, boxes[0]["b"][1] + 8, "backward", size=13, color=BACKWARD)
    c.text(x, top + 585, "Beside the stack: io/ (safetensors, diffusers folders), oracle/ (golden", size=13,
           color=GREY)
    c.text(x, top + 604, "files, nn/recorder.py), testing.py (gradcheck), cli/ (the command).", size=13,
           color=GREY)
    c.text(x, top + 632, "Every gradient an op returns is a fresh array; a module stores the first", size=13)
    c.text(x, top + 651, "one after zero_grad() and adds later ones (residual fan-in: dx = d1 + d2).", size=13)

    # The U-Net, forward along the top, backward along the bottom.
    ux, uy = 650, top + 70
    shift = 30                                        # room for the skip arcs and their label
    c.text(ux, uy - 14, "The U-Net (models/unet/unet_2d_condition.py):", size=15, bold=True)
    names = [("conv_in", ""), ("down_blocks[0]", "resnets, attns"), ("down_blocks[1]", "+ downsample"),
             ("mid_block", "resnet, attn, resnet"), ("up_blocks[0]", "cat(h, skip)"),
             ("up_blocks[1]", "+ upsample"), ("norm, SiLU,", "conv_out")]
    bw, gap = 138, 22
    ub = []
    for i, (n, sub) in enumerate(names):
        ub.append(c.box(ux + i * (bw + gap), uy + 60 + shift, bw, 70, n, [sub] if sub else [], fill="model", size=12))
    for a, b in zip(ub, ub[1:]):
        c.arrow([(a["r"][0], a["r"][1] - 12), (b["l"][0], b["l"][1] - 12)], FORWARD, width=2)
        c.arrow([(b["l"][0], b["l"][1] + 14), (a["r"][0], a["r"][1] + 14)], BACKWARD, width=2)
    # skip connections: down outputs (and conv_in's) feed the up blocks
    for (i, j), lift in (((0, 5), 30), ((1, 5), 45), ((2, 4), 60)):
        src, dst = ub[i]["t"], ub[j]["t"]
        c.arrow([(src[0] + 20, src[1]), (src[0] + 20, src[1] - lift), (dst[0] - 20 + (j - 4) * 10, dst[1] - lift),
                 (dst[0] - 20 + (j - 4) * 10, dst[1])], GREY, width=2)
    c.text(ux + 470, uy + 10, "skips: each down state is concatenated into an up block", size=12, color=GREY)
    for (i, j), drop in (((5, 0), 30), ((5, 1), 45), ((4, 2), 60)):
        src, dst = ub[i]["b"], ub[j]["b"]
        c.arrow([(src[0] + 20 - (i - 4) * 10, src[1]), (src[0] + 20 - (i - 4) * 10, src[1] + drop),
                 (dst[0] + 20, dst[1] + drop), (dst[0] + 20, dst[1])], BACKWARD, width=2)
    c.text(ux + 470, uy + 195 + shift, "dskips: an up block's backward returns d skip, added to that down state's grad",
           size=12, color=BACKWARD)
    steps = [
        "Backward order (UNet2DConditionModel.backward), from d eps_hat:",
        "1. conv_out, SiLU, conv_norm_out: their op backwards in reverse order of the forward.",
        "2. up_blocks in reverse: each returns d h, d skips (one per concatenated state), d temb, d ctx.",
        "3. mid_block, then down_blocks in reverse: each adds the d skips of its states to the",
        "    gradient of its output before walking its own children back.",
        "4. conv_in gets d h + d skip[0]; d temb of every block is summed and goes through",
        "    time_embedding (parameter gradients only: timesteps are integers, no gradient).",
        "5. d ctx of every cross-attention is summed: the gradient w.r.t. the text encoding.",
        "",
        "Inside a block the same rule holds one level down: ResnetBlock2D.backward walks conv2,",
        "dropout, SiLU, norm2, (time_emb_proj), conv1, SiLU, norm1: the exact reverse of its",
        "forward, and adds the shortcut's gradient. Each step ends in an ops/*_backward(dy, cache)",
        "on the cache its forward saved; the caches are freed once the backward has used them.",
    ]
    for i, s in enumerate(steps):
        c.text(ux, uy + 250 + shift + 22 * i, s, size=14, color=INK if i else BACKWARD, bold=(i == 0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "images",
                                                      "architecture.png"))
    args = parser.parse_args(argv)
    c = Canvas()
    c.text(WIDTH / 2, 14, "npdiffusion: how data flows through the packages, and how a backward pass walks back",
           size=21, bold=True, anchor="ma")
    c.text(WIDTH / 2, 44, "blue: forward    red: backward (gradients)    grey: frozen, or data that gets no gradient",
           size=14, color=GREY, anchor="ma")
    training_panel(c, 70)
    sampling_panel(c, 410)
    layers_panel(c, 670)
    c.save(args.out)
    print(os.path.normpath(args.out))


if __name__ == "__main__":
    main()
