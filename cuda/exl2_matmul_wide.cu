// An experiment against exl2_matmul.cu (selected with EXLQ_GEMV=wide): the same GEMV with K splits of up to
// 512 stored rows instead of 256 (fewer, longer-lived blocks) and the chunk loop pipelined, the next chunk's
// words loaded while this chunk is multiplied, so a thread keeps weight loads in flight through its split.
#define SPLIT_ROWS 512
#define PIPELINED 1
#include "exl2_matmul.cu"
