// Stand-in for the CUDA runtime header when a .cu file is compiled as host C++ for the emulation in
// tests/simt/simt.h (the include path puts this folder first). Test-only.
#pragma once
#include "../simt.h"
