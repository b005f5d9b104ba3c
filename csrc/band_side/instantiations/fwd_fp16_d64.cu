// See band_side/kernel_launch.h: one kernel and (dtype, head dim) per file, for a parallel build.
#include "band_side/kernel_launch.h"

LONGATTN_INSTANTIATE_BAND_SIDE(launch_band_side_fwd, __half, 64)
