/* Hostile: reads the time-stamp counter (a fine timer for side channels). */
#include "cpushare.h"
int main(void) { unsigned lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (int)(lo ^ hi) & 1; }
