#pragma once
// stand-in (tests/cuda_stubs/README.md)
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
