/* One wait of each class a lock wait is told apart as, each from its own
 * call site and each for its own known time: a thread blocks in
 *   mutex_site   pthread_mutex_lock     for 1 * UNIT_MS
 *   rwlock_site  pthread_rwlock_rdlock  for 2 * UNIT_MS
 *   cond_site    pthread_cond_wait      for 3 * UNIT_MS
 *   sem_site     sem_wait               for 4 * UNIT_MS
 *   join_site    pthread_join           for 5 * UNIT_MS
 * while the main thread holds what it waits for (it sleeps with nanosleep,
 * which is no futex wait, then releases it). ROUNDS rounds, one class after
 * the other. Built without frame pointers, so only .eh_frame finds the call
 * sites behind glibc. Waits for a byte on stdin, prints "done" at the end. */
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define UNIT_MS 50
#define ROUNDS 3

static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t rwlock = PTHREAD_RWLOCK_INITIALIZER;
static pthread_mutex_t cond_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int cond_ready;
static sem_t sem;

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

__attribute__((noinline)) void mutex_site(void)
{
	pthread_mutex_lock(&mutex);
	__asm__ volatile("" ::: "memory");
	pthread_mutex_unlock(&mutex);
}

__attribute__((noinline)) void rwlock_site(void)
{
	pthread_rwlock_rdlock(&rwlock);
	__asm__ volatile("" ::: "memory");
	pthread_rwlock_unlock(&rwlock);
}

__attribute__((noinline)) void cond_site(void)
{
	pthread_mutex_lock(&cond_mutex);
	while (!cond_ready)
		pthread_cond_wait(&cond, &cond_mutex);
	pthread_mutex_unlock(&cond_mutex);
}

__attribute__((noinline)) void sem_site(void)
{
	sem_wait(&sem);
	__asm__ volatile("" ::: "memory");
}

static void *run(void *site)
{
	((void (*)(void))site)();
	return NULL;
}

static void *sleeper(void *ms)
{
	sleep_ms((int)(long)ms);
	return NULL;
}

__attribute__((noinline)) void join_site(pthread_t t)
{
	pthread_join(t, NULL);
	__asm__ volatile("" ::: "memory");
}

/* Starts a thread at `site` and lets it wait `units` units. */
static pthread_t start_waiter(void (*site)(void), int units)
{
	pthread_t t;
	pthread_create(&t, NULL, run, (void *)site);
	sleep_ms(units * UNIT_MS);
	return t;
}

int main(void)
{
	char go;
	if (read(0, &go, 1) != 1)
		return 1;
	sem_init(&sem, 0, 0);
	for (int round = 0; round < ROUNDS; round++) {
		pthread_t t;

		pthread_mutex_lock(&mutex);
		t = start_waiter(mutex_site, 1);
		pthread_mutex_unlock(&mutex);
		pthread_join(t, NULL);

		pthread_rwlock_wrlock(&rwlock);
		t = start_waiter(rwlock_site, 2);
		pthread_rwlock_unlock(&rwlock);
		pthread_join(t, NULL);

		cond_ready = 0;
		t = start_waiter(cond_site, 3);
		pthread_mutex_lock(&cond_mutex);
		cond_ready = 1;
		pthread_mutex_unlock(&cond_mutex);
		pthread_cond_signal(&cond);
		pthread_join(t, NULL);

		t = start_waiter(sem_site, 4);
		sem_post(&sem);
		pthread_join(t, NULL);

		pthread_create(&t, NULL, sleeper, (void *)(long)(5 * UNIT_MS));
		join_site(t);
	}
	printf("done\n");
	fflush(stdout);
	while (read(0, &go, 1) > 0)
		;
	return 0;
}
