/* Threads for the kernels: run_parts for independent ranges of rows, and teams (see team.h). */
#include "team.h"

void run_parts(void *(*fn)(void *), char *args, size_t size, int n) {
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 1; k < n; k++)
        started[k] = pthread_create(&tid[k], NULL, fn, args + k * size) == 0;
    fn(args);
    for (int k = 1; k < n; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else
            fn(args + k * size);
    }
}

/* Member m's hidden units [u0, u1) of H: a share of the LSTM_BLOCK-unit blocks. */
static void member_units(const LstmJob *job, int m, int *u0, int *u1) {
    const int blocks = (job->H + LSTM_BLOCK - 1) / LSTM_BLOCK;
    const int b0 = blocks * m / job->size, b1 = blocks * (m + 1) / job->size;
    *u0 = b0 * LSTM_BLOCK;
    *u1 = b1 * LSTM_BLOCK < job->H ? b1 * LSTM_BLOCK : job->H;
}

LstmJob *member_start(void *arg, int *m, int *u0, int *u1) {
    const LstmMember *me = arg;
    LstmJob *job = me->job;
    while (!__atomic_load_n(&job->go, __ATOMIC_ACQUIRE))
        sched_yield();
    *m = me->member;
    member_units(job, *m, u0, u1);
    return job;
}

int team_limit(const LstmJob *job, int threads) {
    const int parts = job->by_rows ? job->B / MIN_ROWS_PER_THREAD : (job->H + LSTM_BLOCK - 1) / LSTM_BLOCK;
    const int want = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    return want < parts ? want : (parts > 0 ? parts : 1);
}

void run_team(void *(*fn)(void *), LstmJob *job, int threads) {
    const int want = team_limit(job, threads);
    pthread_t tid[MAX_THREADS];
    LstmMember members[MAX_THREADS];
    int n = 1;
    job->go = 0;
    for (; n < want; n++) {
        members[n] = (LstmMember){job, n};
        if (pthread_create(&tid[n], NULL, fn, &members[n]) != 0)
            break;
    }
    job->size = n;
    job->barrier = (Barrier){n, 0, 0};
    __atomic_store_n(&job->go, 1, __ATOMIC_RELEASE);
    members[0] = (LstmMember){job, 0};
    fn(&members[0]);
    for (int k = 1; k < n; k++)
        pthread_join(tid[k], NULL);
}
