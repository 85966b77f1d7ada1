"""``npdiffusion train unet``: train a latent-diffusion U-Net on a frozen VAE and a frozen CLIP text encoder.

Shape legend: B batch, L latent channels, h latent side (S / VAE factor), T tokens
(tokenizer.model_max_length), D text hidden size (= the U-Net's cross_attention_dim), N images.

Before the first step, the frozen models are run once over the data (they never change, so
running them every step would only burn time):

    q(z | x_n) = N(mean_n, std_n^2)       the VAE posterior of every training image   (N, L, h, h) x 2
    c_k        = text_encoder(ids_k)      last_hidden_state of every distinct caption  (K, T, D)
                                          and of the empty caption "" (the unconditional context)

Per step (diffusers' examples/text_to_image/train_text_to_image.py; docs/training.md, "The U-Net stage")::

    z0     = (mean + std * e0) * scaling_factor      e0 ~ N(0, I): latent_dist.sample() x scaling
    c      = c_caption, or c_"" with probability caption_dropout  (classifier-free guidance)
    t      ~ U{0, ..., num_train_timesteps - 1},  noise ~ N(0, I)
    z_t    = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise                      (q_sample)
    target = noise (epsilon) or sqrt(abar_t) noise - sqrt(1 - abar_t) z0 (v_prediction)
    loss   = mean_b w_b mean_i (unet(z_t, t, c) - target)^2,  w_b = 1 or the Min-SNR-gamma weight

With ``[unet] inpainting = true`` the U-Net takes 2L + 1 channels, [z_t | mask | masked-image latents],
a random mask per sample (``inpaint_masks.py``; docs/inpainting.md, "The inpainting model").

Every draw comes from the trainer's generator, so a resumed run is exact; each is drawn for the
whole global batch and a data-parallel rank keeps its own rows (``distributed.sharding``), so N
ranks train on the draws of one process. The exported U-Net is
the EMA of the weights when ``train.use_ema``. At the end ``output_dir/model`` receives a complete
diffusers pipeline folder (vae, text_encoder, tokenizer, unet, scheduler, model_index.json) that
``StableDiffusionPipeline.from_pretrained`` loads here and in diffusers; its scheduler is
DPM-Solver++ (2M) with the training noise schedule and prediction type.
Docs: docs/training.md ("The U-Net stage").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy

from npdiffusion.nn.module import Module
from npdiffusion.training.config import StageConfig, option, section
from npdiffusion.training.loop import Stage

NAME = "unet"
ENCODE_BATCH = 128
UNET_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")


@dataclass
class UNetOptions:
    """``[unet]``: the frozen models, the U-Net and the diffusion objective."""

    pretrained: str = option("", "start from this model instead of random weights: a pipeline folder "
                             "(model_index.json) or a U-Net folder, ours or diffusers'; the U-Net keeps its sizes, "
                             "and the VAE, text encoder, tokenizer and schedule come from its pipeline unless given "
                             "here (docs/training.md, 'Fine-tuning a pretrained model')")
    vae: str = option("runs/vae/vae", "the trained VAE folder (from `npdiffusion train vae`)")
    text_encoder: str = option("runs/clip/text_encoder", "the trained text encoder folder (from `npdiffusion "
                               "train clip`)")
    tokenizer: str = option("runs/clip/tokenizer", "the tokenizer folder that goes with the text encoder")
    block_out_channels: tuple[int, ...] = option((32, 64), "channels of each U-Net level (each level after the "
                                                 "first halves the latent side)", min=1)
    down_block_types: tuple[str, ...] = option(UNET_BLOCKS, "diffusers block type of each level, "
                                               "CrossAttnDownBlock2D (with cross-attention to the caption) or "
                                               "DownBlock2D; the up path mirrors it")
    layers_per_block: int = option(1, "ResNet (+ transformer) layers per level (the up path has one more)", min=1)
    attention_head_dim: int = option(8, "channels per attention head", min=1)
    norm_num_groups: int = option(8, "GroupNorm groups (must divide every channel count)", min=1)
    prediction_type: str = option("epsilon", "what the U-Net predicts: the noise, v, or the clean latents "
                                  "('sample')", choices=("epsilon", "v_prediction", "sample"))
    snr_gamma: float = option(0.0, "Min-SNR-gamma loss weighting (5.0 is the paper's); 0 disables it", min=0.0)
    caption_dropout: float = option(0.1, "probability of training on the empty caption (classifier-free "
                                    "guidance needs it)", min=0.0)
    num_train_timesteps: int = option(1000, "diffusion steps T", min=2)
    beta_schedule: str = option("scaled_linear", "noise schedule (diffusers' names)",
                                choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    beta_start: float = option(0.00085, "first beta (linear / scaled_linear)", min=0.0)
    beta_end: float = option(0.012, "last beta (linear / scaled_linear)", min=0.0)
    train_text_encoder: bool = option(False, "train the text encoder too (its hand-written backward; the "
                                      "captions are encoded at every step instead of once)")
    text_encoder_learning_rate: float = option(0.0, "the text encoder's AdamW learning rate, on the same schedule "
                                               "(0: train.learning_rate)", min=0.0)
    rescale_betas_zero_snr: bool = option(False, "rescale the schedule to zero terminal SNR (Lin et al. 2024); "
                                          "use with v_prediction: at SNR 0 the noise cannot be predicted")
    sampler: str = option("dpmsolver++", "the sampler written into the pipeline folder: DPM-Solver++ 2M, "
                          "deterministic ('dpmsolver++') or stochastic ('sde-dpmsolver++', DPM-Solver++ 2M SDE)",
                          choices=("dpmsolver++", "sde-dpmsolver++"))
    inpainting: bool = option(False, "train an inpainting U-Net: 2L + 1 input channels, the latents, a random mask "
                              "and the masked image's latents (SD inpainting recipe; docs/inpainting.md)")


@dataclass
class UNetStageConfig(StageConfig):
    """The config file of ``npdiffusion train unet``."""

    output_dir: str = option("runs/unet", "folder for checkpoints, losses, unet/ and the pipeline folder model/")
    unet: UNetOptions = section(UNetOptions, "the frozen models, the U-Net and the diffusion objective")


CONFIG = UNetStageConfig


def training_alphas_cumprod(opts: UNetOptions) -> numpy.ndarray:
    """abar_t (T,) float64 of the schedule the stage trains on (rescaled to zero terminal SNR when asked)."""
    from npdiffusion.diffusion.schedules import alphas_cumprod, rescale_zero_terminal_snr  # noqa: PLC0415
    from npdiffusion.schedulers.training_schedule import make_betas  # noqa: PLC0415

    betas = make_betas("unet", opts.num_train_timesteps, opts.beta_start, opts.beta_end, opts.beta_schedule, None)
    if opts.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod(numpy.asarray(betas, dtype=numpy.float64))


def make_scheduler(opts: UNetOptions):
    """The sampler written into the pipeline folder: DPM-Solver++ 2M (``opts.sampler``: its ODE or SDE form) on
    the training schedule."""
    from npdiffusion.schedulers.dpm_multistep import DPMSolverMultistepScheduler  # noqa: PLC0415

    return DPMSolverMultistepScheduler(num_train_timesteps=opts.num_train_timesteps, beta_start=opts.beta_start,
                                       beta_end=opts.beta_end, beta_schedule=opts.beta_schedule,
                                       prediction_type=opts.prediction_type, algorithm_type=opts.sampler,
                                       rescale_betas_zero_snr=opts.rescale_betas_zero_snr)


class UNetAndTextEncoder(Module):
    """The trained module when ``unet.train_text_encoder``: parameters ``unet.*`` and ``text_encoder.*``."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def start_of(opts: UNetOptions):
    """The ``PretrainedStart`` of ``unet.pretrained`` (npdiffusion/training/pretrained.py), or None."""
    from npdiffusion.training.pretrained import open_start  # noqa: PLC0415

    return open_start(opts, "unet") if opts.pretrained else None


def check_pretrained_unet(unet, base, vae, text_encoder, folders: dict) -> None:
    """A ValueError when the pretrained U-Net cannot run on the VAE's latents or the text encoder's context."""
    pairs = (("in_channels", unet.config["in_channels"], "vae", "latent_channels", vae.config["latent_channels"]),
             ("cross_attention_dim", unet.config["cross_attention_dim"], "text_encoder", "hidden_size",
              text_encoder.config.hidden_size))
    for key, ours, name, their_key, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"the pretrained U-Net {base.unet!r} has {key} = {ours!r} but the {name} "
                             f"{folders[name]!r} has {their_key} = {theirs!r}: they do not fit together")


def _check_folder(key: str, path: str, what: str, stage: str):
    if not os.path.isfile(os.path.join(path, "config.json" if what != "tokenizer" else "vocab.json")):
        raise ValueError(f"unet.{key} {path!r} is not a {what} folder; run `npdiffusion train {stage}` first "
                         f"(or point unet.{key} at its output)")


class UNetStage(Stage):
    """``module`` is the UNet2DConditionModel; VAE and text encoder are frozen (module docstring)."""

    name = NAME
    supports_mixed_precision = True
    train_text_encoder = False           # [unet] train_text_encoder; False: the captions' contexts are cached

    def __init__(self, config: UNetStageConfig, dataset, log=print):
        from npdiffusion.models.clip.text_model import CLIPTextModel  # noqa: PLC0415
        from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel  # noqa: PLC0415
        from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: PLC0415
        from npdiffusion.pipelines.loading import load_tokenizer  # noqa: PLC0415

        opts = config.unet
        self.start = start_of(opts)
        if self.start is not None:                       # fine-tuning: unet.pretrained (pretrained.py)
            opts, folders = self.start.options, self.start.folders
        else:
            _check_folder("vae", opts.vae, "VAE", "vae")
            _check_folder("text_encoder", opts.text_encoder, "text encoder", "clip")
            _check_folder("tokenizer", opts.tokenizer, "tokenizer", "clip")
            folders = {"vae": opts.vae, "text_encoder": opts.text_encoder, "tokenizer": opts.tokenizer}
            n = len(opts.block_out_channels)
            if len(opts.down_block_types) != n:
                raise ValueError(f"unet.down_block_types needs one entry per level of block_out_channels ({n}), "
                                 f"got {len(opts.down_block_types)}")
            bad = [b for b in opts.down_block_types if b not in ("CrossAttnDownBlock2D", "DownBlock2D")]
            if bad:
                raise ValueError(f"unet.down_block_types entries must be CrossAttnDownBlock2D or DownBlock2D, "
                                 f"got {bad[0]!r}")
        self.dtype = numpy.dtype(config.train.dtype)
        self.folders = folders
        self.vae = AutoencoderKL.from_pretrained(folders["vae"]).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(folders["text_encoder"]).eval()
        self.tokenizer = load_tokenizer(folders["tokenizer"])
        if self.start is not None:
            self.unet = self.start.base.load_unet()
            check_pretrained_unet(self.unet, self.start.base, self.vae, self.text_encoder, folders)
        n = len(self.unet.config["block_out_channels"]) if self.start is not None else len(opts.block_out_channels)
        factor = 2 ** (len(self.vae.config["block_out_channels"]) - 1)
        side = config.data.resolution
        if side % factor:
            raise ValueError(f"unet: data.resolution {side} is not a multiple of the VAE's factor {factor}")
        latent_side = side // factor
        if latent_side % (2 ** (n - 1)):
            raise ValueError(f"unet: the latent side {latent_side} must be divisible by 2^{n - 1} for {n} U-Net levels")
        up = tuple("CrossAttnUpBlock2D" if b == "CrossAttnDownBlock2D" else "UpBlock2D"
                   for b in reversed(opts.down_block_types))
        latent_channels = self.vae.config["latent_channels"]
        if self.start is None:
            self.unet = UNet2DConditionModel(
                sample_size=latent_side, in_channels=2 * latent_channels + 1 if opts.inpainting else latent_channels,
                out_channels=latent_channels,
                block_out_channels=tuple(opts.block_out_channels), layers_per_block=opts.layers_per_block,
                down_block_types=tuple(opts.down_block_types), up_block_types=up,
                cross_attention_dim=self.text_encoder.config.hidden_size, attention_head_dim=opts.attention_head_dim,
                norm_num_groups=opts.norm_num_groups)
        self.unet.to(config.train.dtype).train()
        self.module = self.unet
        self.train_text_encoder = opts.train_text_encoder
        if self.train_text_encoder:                      # one module, two learning rates (AdamW lr_ratios)
            self.text_encoder.to(config.train.dtype).train()
            self.module = UNetAndTextEncoder(self.unet, self.text_encoder)
            lr = config.train.learning_rate
            self.lr_ratios = {"text_encoder.": (opts.text_encoder_learning_rate or lr) / lr if lr else 1.0}
        self.opts = opts
        self.alphas_cumprod = training_alphas_cumprod(opts)
        self.scaling_factor = float(self.vae.config["scaling_factor"])
        self.log = log
        self._encode_dataset(dataset)
        self._encode_captions(dataset)

    # ------------------------------------------------------------------ the frozen models, once
    def _encode_dataset(self, dataset):
        self.latent_mean, self.latent_std = self.encode_images(dataset)

    def _encode_comm(self):
        """The communicator the frozen encodings are shared out over: the trainer's, else this process's
        (``get_communicator``: MPI under mpiexec -n N), since the stage encodes before the trainer exists."""
        from npdiffusion.distributed.world import get_communicator  # noqa: PLC0415

        return self.comm if self.comm is not None else get_communicator()

    def encode_images(self, dataset):
        """Posterior mean and std (N, L, h, h) of every image of ``dataset``, in the stage's dtype, on the host.

        In batches of ``ENCODE_BATCH`` images, dealt out over the data-parallel ranks and all-gathered:
        the same bits as one process (``distributed/chunks.py``)."""
        from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
        from npdiffusion.data.dataset import to_model_input  # noqa: PLC0415
        from npdiffusion.distributed.chunks import gather_chunks  # noqa: PLC0415
        from npdiffusion.nn.module import no_cache  # noqa: PLC0415

        def encode(lo, hi):
            post = self.vae.encode(asarray(to_model_input(dataset.get_images(numpy.arange(lo, hi))), dtype=self.dtype))
            return to_numpy(post.mean).astype(self.dtype), to_numpy(post.std).astype(self.dtype)

        with no_cache():
            return gather_chunks(encode, len(dataset), ENCODE_BATCH, self._encode_comm())

    def encode_text(self, captions):
        """last_hidden_state (K, T, D) of ``captions`` under the frozen text encoder (in batches dealt out
        over the ranks, as ``encode_images``)."""
        from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
        from npdiffusion.distributed.chunks import gather_chunks  # noqa: PLC0415
        from npdiffusion.nn.module import no_cache  # noqa: PLC0415

        def encode(lo, hi):
            ids = self.tokenizer(list(captions[lo:hi]))
            return (to_numpy(self.text_encoder(asarray(ids))[0]).astype(self.dtype),)

        with no_cache():
            return gather_chunks(encode, len(captions), ENCODE_BATCH, self._encode_comm())[0]

    def _encode_captions(self, dataset):
        distinct = sorted(set(dataset.captions))
        self.caption_index = {c: i + 1 for i, c in enumerate(distinct)}      # 0 is the empty caption
        self.set_captions([""] + distinct)

    def set_captions(self, texts):
        """The caption rows: token ids (K, T), and with a frozen text encoder their context (K, T, D)."""
        self.caption_ids = self.tokenizer(list(texts))
        self.context = None if self.train_text_encoder else self.encode_text(texts)

    def append_caption(self, text: str) -> int:
        """Add the caption row of ``text``; returns its row."""
        self.caption_ids = numpy.concatenate([self.caption_ids, self.tokenizer([text])])
        if self.context is not None:
            self.context = numpy.concatenate([self.context, self.encode_text([text])])
        return len(self.caption_ids) - 1

    def context_of(self, rows):
        """The U-Net's context (B, T, D) of caption rows (B,): cached, or through the trained text encoder."""
        from npdiffusion.backend import asarray  # noqa: PLC0415

        if self.train_text_encoder:
            return self.text_encoder(self.caption_ids[rows])[0]
        return asarray(self.context[rows], dtype=self.unet.dtype)

    def backward(self, grad) -> None:
        """The U-Net's backward of dL/dout (B, L, h, h); the context's gradient on into the text encoder."""
        _, grad_context = self.unet.backward(grad)
        if self.train_text_encoder:
            self.text_encoder.backward(grad_context)

    # ------------------------------------------------------------------ training
    def collate(self, images, captions, indices, epoch, position):
        """Runs in the prefetch thread: caption rows; pixels only for an inpainting U-Net (the latents are cached)."""
        from npdiffusion.data.loader import Batch  # noqa: PLC0415

        pixels = None
        if self.opts.inpainting:                         # the masked images are encoded per step
            from npdiffusion.data.dataset import to_model_input  # noqa: PLC0415

            pixels = to_model_input(images)
        batch = Batch(pixels, captions, indices, epoch, position)
        batch.caption_rows = numpy.asarray([self.caption_index[c] for c in captions], dtype=numpy.int64)
        return batch

    def noisy_inputs(self, mean, std, caption_rows, draws):
        """``(x_t, t, target, rows)`` of latents drawn from the posteriors ``mean``, ``std`` (B, L, h, h)
        with their caption rows (B,): z0, caption dropout, t and the noise drawn from ``draws`` in that order
        (module docstring); x_t in the U-Net's compute dtype, the target in the stage's, the caption rows
        after dropout (``context_of`` gives their context)."""
        from npdiffusion.backend import asarray  # noqa: PLC0415
        from npdiffusion.diffusion.forward import q_sample  # noqa: PLC0415
        from npdiffusion.diffusion.objectives import training_target  # noqa: PLC0415

        e0 = draws.standard_normal(mean.shape[1:]).astype(self.dtype)
        z0 = (mean + std * e0) * self.dtype.type(self.scaling_factor)
        rows = numpy.where(draws.random() < self.opts.caption_dropout, 0, caption_rows)
        t = draws.integers(0, self.opts.num_train_timesteps)
        noise = draws.standard_normal(z0.shape[1:]).astype(self.dtype)
        z0, noise = asarray(z0), asarray(noise)
        compute = self.unet.dtype                        # float16 under mixed precision, else self.dtype
        x_t = q_sample(z0, t, self.alphas_cumprod, noise).astype(compute)
        target = training_target(z0, noise, t, self.alphas_cumprod, self.opts.prediction_type)
        return x_t, t, target.astype(self.dtype), rows

    def train_step(self, batch, rng):
        from npdiffusion.diffusion.objectives import simple_loss  # noqa: PLC0415
        from npdiffusion.distributed.sharding import batch_draws  # noqa: PLC0415

        idx = numpy.asarray(batch.indices)
        draws = batch_draws(rng, batch)  # drawn for the global batch, this rank's rows kept (sharding.py)
        x_t, t, target, rows = self.noisy_inputs(self.latent_mean[idx], self.latent_std[idx], batch.caption_rows,
                                                 draws)
        if self.opts.inpainting:                         # [z_t | mask | masked-image latents] (inpaint_masks.py)
            from npdiffusion.backend import xp  # noqa: PLC0415
            from npdiffusion.training.inpaint_masks import inpainting_channels  # noqa: PLC0415

            extra = inpainting_channels(self.vae, batch.images, draws, self.scaling_factor, self.dtype)
            x_t = xp.concatenate([x_t, extra.astype(x_t.dtype)], axis=1)
        out = self.unet(x_t, t, self.context_of(rows))
        # the loss and its gradient in float32; the gradient scaled by S before its one cast to float16
        loss, grad = simple_loss(out, target, t, self.alphas_cumprod, self.opts.prediction_type,
                                 self.opts.snr_gamma or None, grad_scale=self.loss_scale)
        self.backward(grad)                              # (an inpainting U-Net's extra channels' gradient unused)
        return {"loss": loss}

    def save_models(self, folder):
        self.unet.save_pretrained(os.path.join(folder, "unet"))
        if self.train_text_encoder:
            self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))

    def load_models(self, folder):
        from npdiffusion.io.pretrained import load_weights  # noqa: PLC0415

        self.unet.load_state_dict(load_weights(os.path.join(folder, "unet")))
        if self.train_text_encoder:
            self.text_encoder.load_state_dict(load_weights(os.path.join(folder, "text_encoder")))

    def pipeline(self, unet=None):
        """A ``StableDiffusionPipeline`` (``StableDiffusionInpaintPipeline`` for an inpainting U-Net) of the
        frozen models and ``unet`` (default: the trained one)."""
        scheduler = self.start.scheduler() if self.start is not None else None
        return pipeline_class(self.opts)(self.vae, self.text_encoder, self.tokenizer, unet or self.unet,
                                         scheduler or make_scheduler(self.opts))


def pipeline_class(opts: UNetOptions):
    """The pipeline that runs the trained U-Net: the inpainting pipeline for ``[unet] inpainting``."""
    if opts.inpainting:
        from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline  # noqa: PLC0415

        return StableDiffusionInpaintPipeline
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415

    return StableDiffusionPipeline


def build_stage(config: UNetStageConfig, dataset) -> UNetStage:
    return UNetStage(config, dataset)


def write_pipeline(config: UNetStageConfig, folder: str) -> str:
    """Assemble ``folder`` (a diffusers pipeline folder) from the stage's inputs and its exported unet/."""
    from npdiffusion.models.clip.text_model import CLIPTextModel  # noqa: PLC0415
    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel  # noqa: PLC0415
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: PLC0415
    from npdiffusion.pipelines.loading import load_tokenizer  # noqa: PLC0415
    from npdiffusion.training.pretrained import write_finetuned_pipeline  # noqa: PLC0415

    opts, start = config.unet, start_of(config.unet)
    folders = {"vae": opts.vae, "text_encoder": opts.text_encoder, "tokenizer": opts.tokenizer}
    if start is not None:
        folders = start.folders
    if opts.train_text_encoder:
        folders = {**folders, "text_encoder": os.path.join(config.output_dir, "text_encoder")}
    if start is not None:
        opts = start.options
        if start.base.pipeline is not None:   # the original's components and scheduler, the trained ones
            trained = {"unet": os.path.join(config.output_dir, "unet")}
            return write_finetuned_pipeline(start.base, folder, {**folders, **trained}, start.overrides)
    pipe = pipeline_class(config.unet)(AutoencoderKL.from_pretrained(folders["vae"]),
                                       CLIPTextModel.from_pretrained(folders["text_encoder"]),
                                       load_tokenizer(folders["tokenizer"]),
                                       UNet2DConditionModel.from_pretrained(os.path.join(config.output_dir, "unet")),
                                       make_scheduler(opts))
    return pipe.save_pretrained(folder)


def train(config: UNetStageConfig, resume: bool = False, progress=None, log=print) -> str:
    """Train the U-Net (see the module docstring), then write ``output_dir/model``; returns a summary."""
    from npdiffusion.training.stages import run_model_stage  # noqa: PLC0415

    from npdiffusion.distributed.world import get_communicator  # noqa: PLC0415

    summary = run_model_stage(config, build_stage, resume=resume, progress=progress, log=log)
    if not get_communicator().is_root:  # data-parallel: rank 0 alone writes
        return summary
    folder = write_pipeline(config, os.path.join(config.output_dir, "model"))
    return summary + f"; pipeline folder {folder}"
