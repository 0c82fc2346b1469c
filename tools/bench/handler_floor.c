/*
 * The C twin of handler_floor.py's inline handler: the same ring layout, the same steps
 * (available index, two direct descriptors with bounds checks, request decode, bitmap check
 * and flip, response, used element, used index), woken the same way (a thread in epoll on
 * an eventfd that the driver signals after filling the ring and idling) and timed over the
 * same window (lock taken to used index published). Prints the median nanoseconds.
 *
 * usage: handler_floor IDLE_NS REQUESTS
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define QUEUE_SIZE 256
#define DESC_AT 0x0
#define AVAIL_AT 0x1000
#define USED_AT 0x2000
#define BUFFERS_AT 0x3000
#define RAM_SIZE 0x10000
#define BLOCKS 1024
#define BLOCKS_PER_REQUEST 64
#define REQUEST_SIZE 24
#define RESPONSE_SIZE 10
#define F_NEXT 1
#define F_WRITE 2
enum { PLUG = 0, UNPLUG = 1, ACK = 0, ERROR = 3 };

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct request { uint16_t type; uint8_t pad0[6]; uint64_t addr; uint16_t nb_blocks; uint8_t pad1[6]; };

static uint8_t ram[RAM_SIZE] __attribute__((aligned(4096)));
static uint8_t bitmap[BLOCKS];  /* a byte per block: the bit packing is not what is measured */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint16_t last_avail, used_idx, driver_idx;

static uint16_t *u16(uint32_t at) { return (uint16_t *)(ram + at); }

static void offer(uint16_t type, uint64_t first)
{
    uint16_t head = 2 * (driver_idx % (QUEUE_SIZE / 2));
    uint32_t out_at = BUFFERS_AT + 64 * head, in_at = out_at + 32;
    struct request req = { .type = type, .addr = first, .nb_blocks = BLOCKS_PER_REQUEST };
    struct desc out = { out_at, REQUEST_SIZE, F_NEXT, head + 1 }, in = { in_at, RESPONSE_SIZE, F_WRITE, 0 };
    memcpy(ram + out_at, &req, sizeof(req));
    memcpy(ram + DESC_AT + 16 * head, &out, sizeof(out));
    memcpy(ram + DESC_AT + 16 * (head + 1), &in, sizeof(in));
    u16(AVAIL_AT)[2 + driver_idx % QUEUE_SIZE] = head;
    u16(AVAIL_AT)[1] = ++driver_idx;
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Answer the next request; the response type (-1: none taken), its time in *ns. */
static __attribute__((noinline)) int handle(long *ns)
{
    int resp = -1;
    pthread_mutex_lock(&lock);
    long started = now_ns();
    uint16_t idx = last_avail;
    uint16_t pending = (uint16_t)(u16(AVAIL_AT)[1] - idx);
    if (pending == 0 || pending > QUEUE_SIZE)
        goto out;
    uint16_t head = u16(AVAIL_AT)[2 + idx % QUEUE_SIZE];
    struct desc out, in;
    memcpy(&out, ram + DESC_AT + 16 * (head % QUEUE_SIZE), sizeof(out));
    if (out.flags != F_NEXT || out.next >= QUEUE_SIZE)
        goto out;
    memcpy(&in, ram + DESC_AT + 16 * out.next, sizeof(in));
    if (in.flags != F_WRITE || out.len < REQUEST_SIZE || in.len < RESPONSE_SIZE || out.addr + out.len > RAM_SIZE ||
        in.addr + in.len > RAM_SIZE)
        goto out;
    struct request req;
    memcpy(&req, ram + out.addr, sizeof(req));
    unsigned set = 0, wanted = req.type == PLUG ? 0 : req.nb_blocks;
    resp = ERROR;
    if (req.addr + req.nb_blocks <= BLOCKS) {
        for (unsigned i = 0; i < req.nb_blocks; i++)
            set += bitmap[req.addr + i];
        if (set == wanted) {
            memset(bitmap + req.addr, req.type == PLUG, req.nb_blocks);
            resp = ACK;
        }
    }
    uint16_t answer[5] = { (uint16_t)resp, 0, 0, 0, 0 };
    memcpy(ram + in.addr, answer, sizeof(answer));
    last_avail = idx + 1;
    uint32_t elem[2] = { head, RESPONSE_SIZE };
    memcpy(ram + USED_AT + 4 + 8 * (used_idx % QUEUE_SIZE), elem, sizeof(elem));
    __atomic_store_n(u16(USED_AT) + 1, ++used_idx, __ATOMIC_RELEASE);
    *ns = now_ns() - started;
out:
    pthread_mutex_unlock(&lock);
    return resp;
}

struct handler { int kick, done, requests; long *times; int *resps; };

/* The handler thread: wait for a kick, answer, report; `requests` times. */
static void *serve(void *arg)
{
    struct handler *h = arg;
    int poller = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = h->kick };
    epoll_ctl(poller, EPOLL_CTL_ADD, h->kick, &ev);
    for (int i = 0; i < h->requests; i++) {
        uint64_t count;
        while (epoll_wait(poller, &ev, 1, -1) != 1)
            ;
        if (read(h->kick, &count, sizeof(count)) != sizeof(count))
            h->resps[i] = -2;
        else
            h->resps[i] = handle(&h->times[i]);
        count = 1;
        if (write(h->done, &count, sizeof(count)) != sizeof(count))
            abort();
    }
    close(poller);
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s IDLE_NS REQUESTS\n", argv[0]);
        return 2;
    }
    long idle_ns = atol(argv[1]);
    int requests = atoi(argv[2]);
    if (requests <= 0) {
        fprintf(stderr, "REQUESTS must be positive\n");
        return 2;
    }
    struct handler h = { eventfd(0, 0), eventfd(0, 0), requests, calloc(requests, sizeof(long)),
                         calloc(requests, sizeof(int)) };
    pthread_t thread;
    if (h.kick < 0 || h.done < 0 || !h.times || !h.resps || pthread_create(&thread, NULL, serve, &h)) {
        perror("handler_floor");
        return 1;
    }
    for (int i = 0; i < requests; i++) {
        offer(i % 2 ? UNPLUG : PLUG, (i / 2) % (BLOCKS / BLOCKS_PER_REQUEST) * BLOCKS_PER_REQUEST);
        struct timespec idle = { idle_ns / 1000000000L, idle_ns % 1000000000L };
        if (idle_ns)
            nanosleep(&idle, NULL);
        uint64_t count = 1;
        if (write(h.kick, &count, sizeof(count)) != sizeof(count) || read(h.done, &count, sizeof(count)) != sizeof(count))
            abort();
        if (h.resps[i] != ACK) {
            fprintf(stderr, "the floor handler answered %d to request %d\n", h.resps[i], i);
            return 1;
        }
    }
    pthread_join(thread, NULL);
    long *times = h.times;
    qsort(times, requests, sizeof(*times), by_value);
    printf("%ld\n", times[requests / 2]);
    return 0;
}
