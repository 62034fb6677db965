#pragma once
// stand-in (tests/cuda_stubs/README.md)
#include "cusolver_common.h"
typedef struct cusolverDnContext* cusolverDnHandle_t;
