// The two memory-ordering steps of experts/exchange.py's shared-memory all-gather, which Python
// cannot express: a rank's rows are stored before its counter says they are there (the sfence
// orders the streaming stores a large memcpy may use; x86 orders the rest), and a reader sees the
// rows once it has seen every counter.
#include <immintrin.h>
#include <sched.h>

#include <chrono>
#include <cstring>

#include "cpu_kernels.h"

extern "C" {
void shm_publish(void* dst, const void* src, int64_t bytes, int64_t* counter, int64_t value) {
    std::memcpy(dst, src, size_t(bytes));
    _mm_sfence();
    __atomic_store_n(counter, value, __ATOMIC_RELEASE);
}

int shm_wait(const int64_t* counters, int64_t n, int64_t stride, int64_t value, int64_t timeout_us) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t spins = 0;; spins++) {
        int64_t i = 0;
        while (i < n && __atomic_load_n(counters + i * stride, __ATOMIC_ACQUIRE) >= value) i++;
        if (i == n) return 1;
        if (spins % 64 == 63) {  // a host with more ranks than cores: let the rank we wait for run
            sched_yield();
            const auto waited = std::chrono::steady_clock::now() - start;
            if (std::chrono::duration_cast<std::chrono::microseconds>(waited).count() >= timeout_us) return 0;
        }
        _mm_pause();
    }
}
}
