// See band_side/kernel_launch.h: one (dtype, head dim) per file, for a parallel build.
#include "longformer/fused_fwd.h"

LONGATTN_INSTANTIATE_LONGFORMER_FWD(__nv_bfloat16, 32)
