#pragma once
// stand-in (tests/cuda_stubs/README.md)
typedef struct cublasLtContext* cublasLtHandle_t;
