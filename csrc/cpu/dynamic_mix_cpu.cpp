// Placeholder: replaced by the fused CPU kernel.
#include "dynamic_mix.h"
