"""Building blocks shared by the U-Net and the VAE, with diffusers' parameter names.

* ``resnet.ResnetBlock2D``: GroupNorm -> SiLU -> 3x3 conv (+ projected timestep embedding) ->
  GroupNorm -> SiLU -> dropout -> 3x3 conv, plus a (1x1-projected) shortcut.
* ``sampling.Downsample2D`` / ``sampling.Upsample2D``: stride-2 3x3 convolution (or 2x2 average
  pooling), and nearest-neighbour x2 upsampling followed by a 3x3 convolution.

Every block has a hand-written ``backward``; derivations and data-flow diagrams: docs/unet.md.
"""
