#pragma once
// stand-in (tests/cuda_stubs/README.md)
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
