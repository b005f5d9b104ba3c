// See band_side/kernel_launch.h: one (dtype, head dim) per file, for a parallel build.
#include "longformer/fused_bwd_rows.h"

LONGATTN_INSTANTIATE_LONGFORMER_BWD_ROWS(__half, 128)
