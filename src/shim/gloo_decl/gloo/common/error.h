// Declarations only (see gloo_decl/README).
#pragma once
#include "gloo/context.h"
