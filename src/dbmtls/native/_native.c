/*
 * dbmtls._native: the native data plane (docs/native.md).
 *
 * Python stays the control plane: it accepts the app's connection, decides what the protocol
 * needs, connects TCP to the server, and then hands both sockets over.  From then on this file
 * owns them: the TLS handshake toward the server (OpenSSL 3, SSL_set_fd on the socket, no
 * memory BIOs) and the relay of the established connection run in native worker threads, each
 * with its own epoll loop, without the GIL and without a Python object per record.
 *
 * Python talks to a worker through a command queue and an eventfd (Engine.connect, Conn.relay,
 * Conn.fail_app, Conn.close, Conn.abort); workers answer through an event queue and one eventfd
 * that the asyncio loop watches (Engine.events).  So Python runs once per connection *event*
 * (handshake done, server failed before its first byte, connection over), never per chunk.
 *
 * Ownership: a conn_t is reference counted (the Python Conn object and the worker that runs it
 * each hold one reference), so Python can read the byte counters of a connection the worker has
 * finished.  Its file descriptors and SSL object belong to the worker alone, from the command
 * that hands them over until the worker closes them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "dbmtls._native needs OpenSSL 3"
#endif

/* One read from a socket and one write to the other moves at most this much.  64 KiB batches
 * cut syscalls for large values (measured: the 64 KiB Redis load) and are what one TLS read-ahead
 * buffer holds; the batch lives in the worker's scratch buffer, not in the connection. */
#define BATCH (64 * 1024)
/* Timers (idle timeout, the half-close linger, the close-flush bound) are checked this often. */
#define SWEEP_MS 100
/* After the app's EOF the TLS side says close_notify (TLS 1.3's half-close: "I send no more") and
 * stays open while the server keeps sending; it is closed when the server closes too, or once it
 * has been quiet this long (a server that ignores close_notify; proxy/relay.py HALF_CLOSE_LINGER). */
#define LINGER_MS 1000

/* ---------------------------------------------------------------------------------------------
 * Errors: what went wrong, in terms Python turns into the same exceptions its ssl module and
 * sockets raise (dbmtls/native/plane.py), so tls/context.py's classify() sees no difference.
 */
enum { E_NONE = 0, E_OS, E_SSL, E_VERIFY, E_EOF, E_SILENT };

typedef struct {
    int kind;       /* E_* */
    long code;      /* errno (E_OS) or X509 verify result (E_VERIFY) */
    char lib[48];   /* OpenSSL library name, upper case (E_SSL) */
    char reason[96];/* OpenSSL reason as ssl.SSLError.reason spells it: WRONG_VERSION_NUMBER */
    char text[160]; /* OpenSSL's own words */
} errinfo_t;

static void upper_underscore(char *dst, size_t size, const char *src) {
    size_t i = 0;
    for (; src && src[i] && i + 1 < size; i++) {
        char ch = src[i];
        dst[i] = ch == ' ' ? '_' : (ch >= 'a' && ch <= 'z') ? (char)(ch - 'a' + 'A') : ch;
    }
    dst[i] = 0;
}

/* ---------------------------------------------------------------------------------------------
 * Context: an SSL_CTX built from the same files and settings as the database's ssl.SSLContext
 * (dbmtls/native/tls.py passes that context's options, versions, ciphers and security level).
 */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} ContextObject;

static PyObject *NativeError; /* dbmtls._native.Error: a context could not be built */

static PyObject *raise_openssl(const char *what) {
    unsigned long e = ERR_peek_last_error();
    char buf[256];
    if (e) {
        ERR_error_string_n(e, buf, sizeof buf);
        PyErr_Format(NativeError, "%s: %s", what, buf);
    } else {
        PyErr_Format(NativeError, "%s", what);
    }
    ERR_clear_error();
    return NULL;
}

/* A key protected by a passphrase has nobody to ask for it in a sidecar: fail, never prompt. */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
    (void)buf; (void)size; (void)rwflag; (void)u;
    return 0;
}

static int Context_init(ContextObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"cafile", "default_verify_paths", "certfile", "keyfile", "verify", "options",
                             "min_version", "max_version", "ciphers", "security_level", "alpn", NULL};
    const char *cafile = NULL, *certfile = NULL, *keyfile = NULL, *ciphers = NULL;
    int default_paths = 0, verify = 1, min_version = TLS1_2_VERSION, max_version = 0, seclevel = -1;
    unsigned long long options = 0;
    Py_buffer alpn = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$zpzzpKiizis*", kwlist, &cafile, &default_paths, &certfile,
                                     &keyfile, &verify, &options, &min_version, &max_version, &ciphers, &seclevel,
                                     &alpn))
        return -1;
    if (self->ctx) {
        PyBuffer_Release(&alpn);
        PyErr_SetString(PyExc_RuntimeError, "Context already initialised");
        return -1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        PyBuffer_Release(&alpn);
        raise_openssl("SSL_CTX_new");
        return -1;
    }
    const char *failed = NULL;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS /* loading a trust store can take tens of milliseconds */
    SSL_CTX_clear_options(ctx, SSL_CTX_get_options(ctx));
    SSL_CTX_set_options(ctx, (uint64_t)options);
    /* PARTIAL_WRITE: SSL_write returns after each record, so a full socket never makes us keep
     * a whole batch inside OpenSSL; MOVING_WRITE_BUFFER: a retry may come from our pending copy;
     * RELEASE_BUFFERS: an idle connection keeps no read or write buffer (about 34 KiB each). */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_clear_mode(ctx, SSL_MODE_AUTO_RETRY);
    /* read-ahead into a 64 KiB buffer: one recv per batch instead of two per record */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, BATCH);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    /* no sessions kept unless Context.enable_sessions() (tls.sessionResumption) turns the cache on */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (seclevel >= 0) SSL_CTX_set_security_level(ctx, seclevel);
    if (ok && ciphers && !SSL_CTX_set_cipher_list(ctx, ciphers)) { ok = 0; failed = "cipher list"; }
    if (ok && !SSL_CTX_set_min_proto_version(ctx, min_version)) { ok = 0; failed = "minimum version"; }
    if (ok && !SSL_CTX_set_max_proto_version(ctx, max_version)) { ok = 0; failed = "maximum version"; }
    /* as CPython does for every context: no partial wildcards ("f*.example") in host names */
    X509_VERIFY_PARAM_set_hostflags(SSL_CTX_get0_param(ctx), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    SSL_CTX_set_verify(ctx, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (ok && cafile) {
        if (!SSL_CTX_load_verify_locations(ctx, cafile, NULL)) { ok = 0; failed = "CA bundle"; }
        else if (sk_X509_OBJECT_num(X509_STORE_get0_objects(SSL_CTX_get_cert_store(ctx))) == 0) {
            ok = 0; failed = "no CA certificate in the CA bundle";
        }
    }
    if (ok && default_paths && !SSL_CTX_set_default_verify_paths(ctx)) { ok = 0; failed = "system trust store"; }
    if (ok && certfile && !SSL_CTX_use_certificate_chain_file(ctx, certfile)) { ok = 0; failed = "certificate chain"; }
    if (ok && keyfile && !SSL_CTX_use_PrivateKey_file(ctx, keyfile, SSL_FILETYPE_PEM)) { ok = 0; failed = "private key"; }
    if (ok && certfile && keyfile && !SSL_CTX_check_private_key(ctx)) { ok = 0; failed = "key does not match certificate"; }
    if (ok && alpn.len && SSL_CTX_set_alpn_protos(ctx, alpn.buf, (unsigned)alpn.len) != 0) { ok = 0; failed = "ALPN"; }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&alpn);
    if (!ok) {
        SSL_CTX_free(ctx);
        raise_openssl(failed);
        return -1;
    }
    self->ctx = ctx;
    return 0;
}

static void Context_dealloc(ContextObject *self) {
    if (self->ctx) SSL_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The leaf certificate this context presents (DER), to check it is the one Python validated. */
static PyObject *Context_leaf_der(ContextObject *self, PyObject *unused) {
    (void)unused;
    X509 *x = self->ctx ? SSL_CTX_get0_certificate(self->ctx) : NULL;
    if (!x) Py_RETURN_NONE;
    unsigned char *der = NULL;
    int n = i2d_X509(x, &der);
    if (n < 0) return raise_openssl("i2d_X509");
    PyObject *out = PyBytes_FromStringAndSize((const char *)der, n);
    OPENSSL_free(der);
    return out;
}

/* The cipher suites a connection would offer, in order (tests compare them with Python's). */
static PyObject *Context_ciphers(ContextObject *self, PyObject *unused) {
    (void)unused;
    SSL *ssl = SSL_new(self->ctx);
    if (!ssl) return raise_openssl("SSL_new");
    STACK_OF(SSL_CIPHER) *sk = SSL_get_ciphers(ssl); /* the configured list, as CPython's get_ciphers() */
    PyObject *out = PyList_New(0);
    for (int i = 0; out && sk && i < sk_SSL_CIPHER_num(sk); i++) {
        PyObject *name = PyUnicode_FromString(SSL_CIPHER_get_name(sk_SSL_CIPHER_value(sk, i)));
        if (!name || PyList_Append(out, name) < 0) Py_CLEAR(out);
        Py_XDECREF(name);
    }
    SSL_free(ssl);
    return out;
}

static PyObject *Context_settings(ContextObject *self, PyObject *unused) {
    (void)unused;
    SSL_CTX *c = self->ctx;
    return Py_BuildValue("{s:K,s:i,s:i,s:i,s:i,s:n}", "options", (unsigned long long)SSL_CTX_get_options(c),
                         "min_version", (int)SSL_CTX_get_min_proto_version(c), "max_version",
                         (int)SSL_CTX_get_max_proto_version(c), "security_level", SSL_CTX_get_security_level(c),
                         "verify_mode", SSL_CTX_get_verify_mode(c), "ca_count",
                         (Py_ssize_t)sk_X509_OBJECT_num(X509_STORE_get0_objects(SSL_CTX_get_cert_store(c))));
}

/* ---------------------------------------------------------------------------------------------
 * Session resumption (docs/tls-resumption.md): a bounded cache of client sessions on the twin
 * SSL_CTX, so per identity (each client certificate has its own context), and inside it per
 * server name.  OpenSSL would resume a session under another SNI name and verifies nothing on a
 * resumed connection, so the key is what keeps a session from being offered on behalf of
 * another identity or to another name, and the name is checked again on resumed connections
 * (sess_check_resumed).  A reload builds new contexts: the old sessions go with the old SSL_CTX
 * (ex_data free callback), never offered with a new certificate.  Workers share the context, so
 * the cache has its own lock; it is taken once per handshake and once per ticket, never per record.
 */
#define SESS_PER_NAME 4

typedef struct sess_name {
    struct sess_name *next;
    char *name;
    SSL_SESSION *s[SESS_PER_NAME]; /* oldest first */
    int n;
    int64_t backoff_until; /* ms (now_ms): no session is offered to this name before then */
} sess_name_t;

typedef struct {
    pthread_mutex_t lock;
    sess_name_t *names;
} sess_cache_t;

static int sess_cache_idx = -1; /* SSL_CTX ex_data index, made at module init */
static int64_t now_ms(void);

static void sess_cache_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    sess_cache_t *cache = ptr;
    if (!cache) return;
    for (sess_name_t *e = cache->names, *next; e; e = next) {
        next = e->next;
        for (int i = 0; i < e->n; i++) SSL_SESSION_free(e->s[i]);
        free(e->name);
        free(e);
    }
    pthread_mutex_destroy(&cache->lock);
    free(cache);
}

static sess_cache_t *sess_cache_of(SSL_CTX *ctx) {
    return ctx && sess_cache_idx >= 0 ? SSL_CTX_get_ex_data(ctx, sess_cache_idx) : NULL;
}

/* With the lock held.  NULL if absent and `create` is 0, or without memory. */
static sess_name_t *sess_entry(sess_cache_t *cache, const char *name, int create) {
    for (sess_name_t *e = cache->names; e; e = e->next)
        if (strcmp(e->name, name) == 0) return e;
    if (!create) return NULL;
    sess_name_t *e = calloc(1, sizeof *e);
    if (!e || !(e->name = strdup(name))) {
        free(e);
        return NULL;
    }
    e->next = cache->names;
    cache->names = e;
    return e;
}

static void sess_drop_all(sess_name_t *e) {
    for (int i = 0; i < e->n; i++) SSL_SESSION_free(e->s[i]);
    e->n = 0;
}

/* OpenSSL's new-session callback (client cache mode): each ticket (TLS 1.3) or session (1.2)
 * the server gives is kept for the next connection of this identity to this name.  The SSL's
 * app data is its connection's server name (sess_offer).  The cache keeps a copy, never
 * OpenSSL's own object: in TLS 1.3 the session a ticket arrives in becomes the connection's
 * current session, and a connection that ends without a clean TLS shutdown (as MariaDB's do
 * after COM_QUIT) has OpenSSL mark that object not resumable, which silently turned the cached
 * entry into a full handshake (tests/e2e/test_resumption.py, the identities test, caught it).  Always returns 0: OpenSSL keeps its reference. */
static int sess_new_cb(SSL *ssl, SSL_SESSION *sess) {
    const char *name = SSL_get_app_data(ssl);
    sess_cache_t *cache = sess_cache_of(SSL_get_SSL_CTX(ssl));
    if (!cache || !name || !SSL_SESSION_is_resumable(sess)) return 0;
    SSL_SESSION *copy = SSL_SESSION_dup(sess);
    if (!copy) return 0;
    int kept = 0;
    pthread_mutex_lock(&cache->lock);
    sess_name_t *e = sess_entry(cache, name, 1);
    if (e && e->backoff_until <= now_ms()) {
        if (e->n == SESS_PER_NAME) { /* bounded: the oldest goes */
            SSL_SESSION_free(e->s[0]);
            memmove(e->s, e->s + 1, (SESS_PER_NAME - 1) * sizeof e->s[0]);
            e->n--;
        }
        e->s[e->n++] = copy;
        kept = 1;
    }
    pthread_mutex_unlock(&cache->lock);
    if (!kept) SSL_SESSION_free(copy);
    return 0;
}

/* Before SSL_connect: offer the newest session this identity has for `name`, taking it out (a
 * TLS 1.3 ticket is single use).  Returns whether one was offered. */
static int sess_offer(SSL *ssl, const char *name) {
    sess_cache_t *cache = sess_cache_of(SSL_get_SSL_CTX(ssl));
    if (!cache || !name || !name[0]) return 0;
    SSL_set_app_data(ssl, (void *)name); /* for sess_new_cb; the name outlives the SSL (conn_t) */
    SSL_SESSION *sess = NULL;
    time_t now = time(NULL);
    pthread_mutex_lock(&cache->lock);
    sess_name_t *e = sess_entry(cache, name, 0);
    if (e && e->backoff_until <= now_ms()) {
        while (e->n > 0 && !sess) {
            SSL_SESSION *s = e->s[--e->n];
            if (SSL_SESSION_is_resumable(s) && SSL_SESSION_get_time(s) + SSL_SESSION_get_timeout(s) > now) sess = s;
            else SSL_SESSION_free(s);
        }
    }
    pthread_mutex_unlock(&cache->lock);
    if (!sess) return 0;
    int ok = SSL_set_session(ssl, sess); /* takes its own reference */
    SSL_SESSION_free(sess);
    return ok == 1;
}

/* After a resumed handshake: the host name (or address) must still be in the certificate the
 * session carries.  OpenSSL does not verify on resumption; the session came from this name's
 * own cache entry, and this check makes sure it can never be what lets a name through. */
static int sess_check_resumed(SSL *ssl, const char *name) {
    if (!SSL_session_reused(ssl) || !name || !name[0]) return 1;
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (!peer) return 0;
    unsigned char addr[16];
    int is_ip = inet_pton(AF_INET, name, addr) == 1 || inet_pton(AF_INET6, name, addr) == 1;
    if (is_ip) return X509_check_ip_asc(peer, name, 0) == 1;
    return X509_check_host(peer, name, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) == 1;
}

/* Context.enable_sessions(): keep the sessions servers give (tls.sessionResumption). */
static PyObject *Context_enable_sessions(ContextObject *self, PyObject *unused) {
    (void)unused;
    if (!self->ctx || sess_cache_idx < 0) return raise_openssl("no context");
    if (sess_cache_of(self->ctx)) Py_RETURN_NONE;
    sess_cache_t *cache = calloc(1, sizeof *cache);
    if (!cache) return PyErr_NoMemory();
    pthread_mutex_init(&cache->lock, NULL);
    if (!SSL_CTX_set_ex_data(self->ctx, sess_cache_idx, cache)) {
        sess_cache_free(NULL, cache, NULL, 0, 0, NULL);
        return raise_openssl("SSL_CTX_set_ex_data");
    }
    /* the client side of the cache, without OpenSSL's own store: sess_new_cb keeps them */
    SSL_CTX_set_session_cache_mode(self->ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(self->ctx, sess_new_cb);
    Py_RETURN_NONE;
}

/* Context.refuse_sessions(name, ms): a handshake offering a session to `name` failed; drop its
 * sessions and offer none for `ms` milliseconds (the server may not resume at all). */
static PyObject *Context_refuse_sessions(ContextObject *self, PyObject *args) {
    const char *name;
    long long ms;
    if (!PyArg_ParseTuple(args, "sL", &name, &ms)) return NULL;
    sess_cache_t *cache = sess_cache_of(self->ctx);
    if (!cache) Py_RETURN_NONE;
    pthread_mutex_lock(&cache->lock);
    sess_name_t *e = sess_entry(cache, name, 1);
    if (e) {
        sess_drop_all(e);
        e->backoff_until = now_ms() + ms;
    }
    pthread_mutex_unlock(&cache->lock);
    Py_RETURN_NONE;
}

/* Context.cached_sessions(name) -> int: how many sessions are kept for `name` (tests, metrics). */
static PyObject *Context_cached_sessions(ContextObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    sess_cache_t *cache = sess_cache_of(self->ctx);
    long n = 0;
    if (cache) {
        pthread_mutex_lock(&cache->lock);
        sess_name_t *e = sess_entry(cache, name, 0);
        n = e ? e->n : 0;
        pthread_mutex_unlock(&cache->lock);
    }
    return PyLong_FromLong(n);
}

/* Context._copy_sessions(src, dst): put the sessions kept for `src` under `dst` too.  For tests
 * only: it makes the mistake the cache's key prevents, to show the name check on resumed
 * connections catches it. */
static PyObject *Context_copy_sessions(ContextObject *self, PyObject *args) {
    const char *src, *dst;
    if (!PyArg_ParseTuple(args, "ss", &src, &dst)) return NULL;
    sess_cache_t *cache = sess_cache_of(self->ctx);
    long n = 0;
    if (cache) {
        pthread_mutex_lock(&cache->lock);
        sess_name_t *from = sess_entry(cache, src, 0), *to = sess_entry(cache, dst, 1);
        for (int i = 0; from && to && i < from->n && to->n < SESS_PER_NAME; i++, n++) {
            SSL_SESSION_up_ref(from->s[i]);
            to->s[to->n++] = from->s[i];
        }
        pthread_mutex_unlock(&cache->lock);
    }
    return PyLong_FromLong(n);
}

static PyMethodDef Context_methods[] = {
    {"leaf_der", (PyCFunction)Context_leaf_der, METH_NOARGS, "DER of the client certificate, or None."},
    {"ciphers", (PyCFunction)Context_ciphers, METH_NOARGS, "Names of the configured cipher suites, in order."},
    {"settings", (PyCFunction)Context_settings, METH_NOARGS, "The settings OpenSSL holds (for tests)."},
    {"enable_sessions", (PyCFunction)Context_enable_sessions, METH_NOARGS, "Keep sessions for resumption."},
    {"refuse_sessions", (PyCFunction)Context_refuse_sessions, METH_VARARGS, "Back off from resuming with a name."},
    {"cached_sessions", (PyCFunction)Context_cached_sessions, METH_VARARGS, "Sessions kept for a name."},
    {"_copy_sessions", (PyCFunction)Context_copy_sessions, METH_VARARGS, "For tests: copy a name's sessions."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dbmtls._native.Context",
    .tp_basicsize = sizeof(ContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An OpenSSL client context built from certificate files.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Context_init,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_methods = Context_methods,
};

/* ---------------------------------------------------------------------------------------------
 * The engine: workers, connections, commands and events.
 */
typedef struct conn conn_t;
typedef struct worker worker_t;
typedef struct engine engine_t;

/* HANDSHAKE -> READY (handshaken; Python looks at the app's first bytes) -> RELAY -> DONE.
 * LOST: the server went away while READY; EARLY: it failed during the relay before its first
 * byte, and Python is telling the app why (Conn.fail_app). */
enum { ST_HANDSHAKE, ST_READY, ST_RELAY, ST_EARLY, ST_LOST, ST_DONE };
enum { SIDE_NONE = 0, SIDE_APP = 1, SIDE_UP = 2 };
enum { EV_HANDSHAKE = 1, EV_EARLY = 2, EV_CLOSED = 3, EV_LOST = 4 };
enum { CMD_START = 1, CMD_RELAY, CMD_FAIL_APP, CMD_CLOSE, CMD_ABORT };
/* in-band, before the relay (PostgreSQL, MySQL): see "In-band" below */
enum { EV_DATA = 5, EV_COPY = 6 };
enum { CMD_WRITE = 16, CMD_WAKE };

typedef struct {
    char *data;
    size_t off, len; /* pending bytes are data[off:len] */
} pend_t;

typedef struct side {
    conn_t *c;
    int fd;
    unsigned readable : 1;    /* an EPOLLIN came since the last EAGAIN or short read */
    unsigned writable : 1;    /* no EAGAIN since the last EPOLLOUT */
    unsigned eof : 1;         /* it sent its EOF */
    unsigned closed : 1;      /* its descriptor is closed (or was never ours) */
    unsigned flush_close : 1; /* close it once `out` is written */
    unsigned shut_wr : 1;     /* pass an EOF on once `out` is written: shutdown SHUT_WR, or close_notify */
    unsigned registered : 1;  /* in the worker's epoll set */
    unsigned hup : 1;         /* the peer's FIN (or an error) is pending: a short read is not "drained" */
    pend_t out;               /* bytes waiting to be written to this side (backpressure) */
} side_t;

struct conn {
    atomic_int refs;
    uint64_t id;
    worker_t *w;
    conn_t *prev, *next;   /* the worker's list of connections */
    conn_t *run_next;      /* the worker's run queue */
    unsigned queued : 1;
    unsigned up_drained : 1;       /* the server socket is empty until its next EPOLLIN */
    unsigned read_wants_write : 1; /* SSL_read needs the socket writable (a TLS message to send) */
    unsigned write_wants_read : 1; /* SSL_write needs data from the server first */
    unsigned tls_dead : 1;         /* a fatal TLS error: no close_notify */
    unsigned handshaken : 1;
    unsigned check_host : 1;
    unsigned want_peer_cert : 1;
    unsigned idled : 1;
    unsigned offered : 1; /* a cached session was offered (session resumption, sess_offer) */
    /* READY: ready_read stopped at a full hold (one batch) with the server maybe not drained; no
     * new EPOLLIN edge will come for what is already there, so Conn.take wakes the worker.  Set
     * and cleared under io_lock, together with the hold it is about. */
    int hold_stopped;
    int state;
    int relay_called; /* Python's alone: not a bit field, which would share a word with the worker's */
    SSL_CTX *ctx; /* NULL: plain TCP toward the server (tls.mode DISABLE) */
    SSL *ssl;
    char *server_name;
    side_t app, up;
    atomic_uint_least64_t from_app, from_up; /* plaintext bytes read from each side */
    int64_t last_io;           /* when a byte was last read from either side (idle timeout) */
    int64_t idle_ms;           /* <= 0: none */
    int64_t reply_deadline;    /* client-first protocols: a silent close before this is a failure */
    int64_t linger_deadline;   /* app EOF'd: check the server's silence at this time (0: not armed) */
    uint64_t linger_seen;
    int64_t closing_since;     /* a flush_close started (bounded by the idle timeout) */
    int lost;                  /* sides closed so far */
    int failed_side;           /* SIDE_* lost with an error first */
    errinfo_t err;
    /* handed over by Python, taken by the worker with the command */
    int new_app_fd;
    pend_t new_pending;
    pend_t fail_message;
    /* in-band (the steps over TLS before the relay; see "In-band" below) */
    pthread_mutex_t io_lock; /* guards the held bytes (app.out while READY or LOST) and wbuf */
    pend_t wbuf;             /* Python's writes toward the server, moved to up.out by CMD_WRITE */
    pend_t new_up_pending;   /* Conn.relay: server bytes Python read, for the app first */
    atomic_int watching;     /* relay: post a copy of each server chunk (EV_COPY) until unwatch() */
};

typedef struct cmd {
    struct cmd *next;
    int op;
    conn_t *c;
} cmd_t;

typedef struct event {
    struct event *next;
    uint64_t id;
    int kind;
    int ok;
    errinfo_t err;
    char version[32];
    char cipher[80];
    unsigned char *der;
    int derlen;
    int failed_side;
    int idled;
    uint64_t from_app, from_up;
    size_t held; /* EV_LOST: server bytes held for the app */
    int resumed, offered; /* EV_HANDSHAKE: the session was resumed / one was offered */
} event_t;

struct worker {
    engine_t *e;
    pthread_t thread;
    int started;
    int epfd;
    int wake_fd;
    pthread_mutex_t lock;
    cmd_t *cmd_head, *cmd_tail;
    int stopping;
    conn_t *conns;
    conn_t *run_head, *run_tail;
    conn_t *reap;
    int nconns;
    int64_t now;
    int64_t next_sweep;
    char *scratch;
};

struct engine {
    worker_t *workers;
    int nworkers;
    int next_worker;
    int notify_fd;
    pthread_mutex_t ev_lock;
    event_t *ev_head, *ev_tail;
    uint64_t next_id;
    int closed;
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void pend_free(pend_t *p) {
    free(p->data);
    p->data = NULL;
    p->off = p->len = 0;
}

static size_t pend_size(const pend_t *p) { return p->len - p->off; }

/* Keep the bytes a write could not take: only a connection under backpressure holds a buffer. */
static int pend_append(pend_t *p, const char *data, size_t n) {
    if (!n) return 0;
    size_t have = pend_size(p);
    char *buf = malloc(have + n);
    if (!buf) return -1;
    if (have) memcpy(buf, p->data + p->off, have);
    memcpy(buf + have, data, n);
    free(p->data);
    p->data = buf;
    p->off = 0;
    p->len = have + n;
    return 0;
}

static void conn_decref(conn_t *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    if (c->ssl) SSL_free(c->ssl);
    if (c->ctx) SSL_CTX_free(c->ctx);
    if (c->new_app_fd >= 0) close(c->new_app_fd);
    pend_free(&c->app.out);
    pend_free(&c->up.out);
    pend_free(&c->new_pending);
    pend_free(&c->fail_message);
    pend_free(&c->wbuf);
    pend_free(&c->new_up_pending);
    pthread_mutex_destroy(&c->io_lock);
    free(c->server_name);
    free(c);
}

/* --- events toward Python -------------------------------------------------------------------- */

static void post(engine_t *e, event_t *ev) {
    pthread_mutex_lock(&e->ev_lock);
    int was_empty = e->ev_head == NULL;
    if (e->ev_tail) e->ev_tail->next = ev;
    else e->ev_head = ev;
    e->ev_tail = ev;
    pthread_mutex_unlock(&e->ev_lock);
    if (was_empty) { /* one wake-up per batch: Python takes every queued event at once */
        uint64_t one = 1;
        ssize_t r = write(e->notify_fd, &one, sizeof one);
        (void)r;
    }
}

static event_t *new_event(conn_t *c, int kind) {
    event_t *ev = calloc(1, sizeof *ev);
    if (ev) {
        ev->id = c->id;
        ev->kind = kind;
    }
    return ev;
}

/* --- the worker's bookkeeping ---------------------------------------------------------------- */

static void run_later(conn_t *c) {
    worker_t *w = c->w;
    if (c->queued || c->state == ST_DONE) return;
    c->queued = 1;
    c->run_next = NULL;
    if (w->run_tail) w->run_tail->run_next = c;
    else w->run_head = c;
    w->run_tail = c;
}

static int side_register(worker_t *w, side_t *s) {
    /* Edge-triggered for both directions, registered once: readiness is remembered in the side's
     * flags, so backpressure and the TLS layer's wants never cost an epoll_ctl. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = s};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) return -1;
    s->registered = 1;
    return 0;
}

static void set_linger0(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

/* Close one side's descriptor.  `reset`: SO_LINGER 0, so the peer reads a reset and never a clean
 * end after half a reply (proxy/relay.py reset()).  A graceful close of the TLS side says
 * close_notify first, as asyncio's TLS transport does, without waiting for the server's. */
static void side_close(conn_t *c, side_t *s, int reset) {
    if (s->closed) return;
    if (s == &c->up && c->ssl) {
        if (!reset && c->handshaken && !c->tls_dead && !(SSL_get_shutdown(c->ssl) & SSL_SENT_SHUTDOWN)) {
            (void)SSL_shutdown(c->ssl);
            ERR_clear_error();
        }
        SSL_free(c->ssl); /* the TLS state goes as soon as the socket does (memory) */
        c->ssl = NULL;
    }
    if (reset) set_linger0(s->fd);
    close(s->fd); /* also removes it from the epoll set: the worker holds its only descriptor */
    s->fd = -1;
    s->closed = 1;
    s->flush_close = 0;
    pend_free(&s->out);
    c->lost++;
}

static void conn_finish(conn_t *c) {
    worker_t *w = c->w;
    if (c->state == ST_DONE) return;
    side_close(c, &c->up, 0);
    side_close(c, &c->app, 0);
    c->state = ST_DONE;
    event_t *ev = new_event(c, EV_CLOSED);
    if (ev) {
        ev->failed_side = c->failed_side;
        ev->err = c->err;
        ev->idled = c->idled;
        ev->from_app = atomic_load_explicit(&c->from_app, memory_order_relaxed);
        ev->from_up = atomic_load_explicit(&c->from_up, memory_order_relaxed);
        post(w->e, ev);
    }
    /* unlink now, drop the worker's reference after this loop iteration: events already taken
     * from epoll in this batch may still point at it */
    if (c->prev) c->prev->next = c->next;
    else w->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = NULL;
    c->next = w->reap;
    w->reap = c;
    w->nconns--;
}

/* --- TLS errors -------------------------------------------------------------------------------- */

static void capture_ssl_error(conn_t *c, int ret, int sslerr, int saved_errno, errinfo_t *out) {
    memset(out, 0, sizeof *out);
    unsigned long l = ERR_peek_last_error();
    if (sslerr == SSL_ERROR_ZERO_RETURN) {
        out->kind = E_EOF;
    } else if (l == 0 && sslerr == SSL_ERROR_SYSCALL) {
        if (ret < 0 && saved_errno) {
            out->kind = E_OS;
            out->code = saved_errno;
        } else {
            out->kind = E_EOF;
        }
    } else if (ERR_GET_LIB(l) == ERR_LIB_SYS) {
        out->kind = E_OS;
        out->code = ERR_GET_REASON(l);
    } else if (ERR_GET_LIB(l) == ERR_LIB_SSL && ERR_GET_REASON(l) == SSL_R_CERTIFICATE_VERIFY_FAILED && c->ssl) {
        out->kind = E_VERIFY;
        out->code = SSL_get_verify_result(c->ssl);
        snprintf(out->text, sizeof out->text, "%s", X509_verify_cert_error_string(out->code));
    } else if (ERR_GET_LIB(l) == ERR_LIB_SSL && ERR_GET_REASON(l) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        out->kind = E_EOF;
    } else {
        out->kind = E_SSL;
        const char *lib = ERR_lib_error_string(l);
        const char *reason = ERR_reason_error_string(l);
        upper_underscore(out->lib, sizeof out->lib, lib ? lib : "SSL");
        if (strcmp(out->lib, "SSL_ROUTINES") == 0) snprintf(out->lib, sizeof out->lib, "SSL");
        /* OpenSSL says "tlsv13 alert certificate required"; Python's ssl module says
         * TLSV13_ALERT_CERTIFICATE_REQUIRED (the macro's name), and classify() reads that */
        if (reason) upper_underscore(out->reason, sizeof out->reason, reason);
        else snprintf(out->reason, sizeof out->reason, "UNKNOWN_%lu", (unsigned long)ERR_GET_REASON(l));
        snprintf(out->text, sizeof out->text, "%s", reason ? reason : "unknown error");
    }
    ERR_clear_error();
}

/* Drained tracking for the server socket.  OpenSSL reads through a socket BIO (SSL_set_fd); this
 * callback sees each read.  A read that returned less than asked for, or EAGAIN, means the socket
 * is empty: until the next EPOLLIN, a read OpenSSL would start is answered "retry" here without
 * a syscall, while records already in its read-ahead buffer are still returned.  This is what
 * keeps the relay at nginx's number of syscalls (one recv per batch, no EAGAIN recv). */
static long bio_cb(BIO *b, int oper, const char *argp, size_t len, int argi, long argl, int ret,
                   size_t *processed) {
    (void)argp; (void)argi; (void)argl;
    conn_t *c = (conn_t *)BIO_get_callback_arg(b);
    if (oper == BIO_CB_READ) {
        if (c && c->up_drained) {
            BIO_clear_retry_flags(b);
            BIO_set_retry_read(b);
            return -1;
        }
        return 1;
    }
    if (oper == (BIO_CB_READ | BIO_CB_RETURN)) {
        /* a short read is "drained" unless the peer's FIN is pending: its edge has already fired,
         * so only reading on until recv says 0 finds it */
        if (c && ((ret > 0 && processed && *processed < len && !c->up.hup) || (ret <= 0 && BIO_should_retry(b))))
            c->up_drained = 1;
        return ret;
    }
    return (oper & BIO_CB_RETURN) ? ret : 1;
}

/* --- the handshake ------------------------------------------------------------------------------ */

static void handshake_failed(conn_t *c) {
    event_t *ev = new_event(c, EV_HANDSHAKE);
    if (ev) {
        ev->ok = 0;
        ev->offered = c->offered;
        ev->err = c->err;
        post(c->w->e, ev);
    }
    c->tls_dead = 1;
    c->err.kind = E_NONE; /* reported with the handshake; the close that follows is plain */
    conn_finish(c);
}

static void handshake_done(conn_t *c) {
    if (c->ssl && c->check_host && !sess_check_resumed(c->ssl, c->server_name)) {
        memset(&c->err, 0, sizeof c->err);
        c->err.kind = E_VERIFY;
        c->err.code = X509_V_ERR_HOSTNAME_MISMATCH;
        snprintf(c->err.text, sizeof c->err.text, "%s", X509_verify_cert_error_string(c->err.code));
        handshake_failed(c);
        return;
    }
    c->handshaken = 1;
    c->state = ST_READY;
    run_later(c); /* what came with the server's last flight (tickets, an alert) */
    event_t *ev = new_event(c, EV_HANDSHAKE);
    if (!ev) return;
    ev->ok = 1;
    ev->offered = c->offered;
    if (c->ssl) {
        ev->resumed = SSL_session_reused(c->ssl);
        snprintf(ev->version, sizeof ev->version, "%s", SSL_get_version(c->ssl));
        const char *cipher = SSL_get_cipher_name(c->ssl);
        snprintf(ev->cipher, sizeof ev->cipher, "%s", cipher ? cipher : "");
        if (c->want_peer_cert) {
            X509 *peer = SSL_get0_peer_certificate(c->ssl);
            if (peer) {
                unsigned char *der = NULL;
                int n = i2d_X509(peer, &der);
                if (n > 0) {
                    ev->der = malloc((size_t)n);
                    if (ev->der) {
                        memcpy(ev->der, der, (size_t)n);
                        ev->derlen = n;
                    }
                }
                OPENSSL_free(der);
            }
        }
    }
    post(c->w->e, ev);
}

static void do_handshake(conn_t *c) {
    if (!c->ssl) {
        handshake_done(c);
        return;
    }
    errno = 0;
    int r = SSL_connect(c->ssl);
    if (r == 1) {
        handshake_done(c);
        return;
    }
    int saved = errno;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) return;
    if (e == SSL_ERROR_WANT_WRITE) {
        c->up.writable = 0;
        return;
    }
    capture_ssl_error(c, r, e, saved, &c->err);
    handshake_failed(c);
}

static int conn_setup_tls(conn_t *c) {
    if (!c->ctx) return 0;
    c->ssl = SSL_new(c->ctx);
    if (!c->ssl || !SSL_set_fd(c->ssl, c->up.fd)) return -1;
    BIO *bio = SSL_get_rbio(c->ssl);
    BIO_set_callback_ex(bio, bio_cb);
    BIO_set_callback_arg(bio, (char *)c);
    /* Name checks as CPython's ssl module sets them for server_hostname (Dialer.handshake):
     * SNI for a name (never for an IP address); with check_hostname the name, or the address,
     * must be in the certificate, verified by OpenSSL during the handshake. */
    if (c->server_name && c->server_name[0]) {
        unsigned char addr[16];
        int is_ip = inet_pton(AF_INET, c->server_name, addr) == 1 || inet_pton(AF_INET6, c->server_name, addr) == 1;
        if (!is_ip && !SSL_set_tlsext_host_name(c->ssl, c->server_name)) return -1;
        if (c->check_host) {
            X509_VERIFY_PARAM *param = SSL_get0_param(c->ssl);
            if (is_ip ? !X509_VERIFY_PARAM_set1_ip_asc(param, c->server_name)
                      : !X509_VERIFY_PARAM_set1_host(param, c->server_name, 0))
                return -1;
        }
    }
    SSL_set_connect_state(c->ssl);
    c->offered = sess_offer(c->ssl, c->server_name);
    return 0;
}

/* --- the relay -------------------------------------------------------------------------------- */

static void up_failed(conn_t *c, errinfo_t *err);
static void app_failed(conn_t *c, int err);
static void post_copy(conn_t *c, const char *data, size_t n); /* In-band, below */

/* A write toward a server that has just hung up fails with EPIPE or ECONNRESET, while the reason
 * it hung up (a TLS alert: our certificate was rejected) may already sit in our receive buffer.
 * Read it, so the app is told the reason and not "connection reset". */
static void prefer_alert(conn_t *c, errinfo_t *err) {
    if (err->kind != E_OS || !c->ssl) return;
    int saved_drained = c->up_drained;
    c->up_drained = 0;
    for (int i = 0; i < 4; i++) {
        errno = 0;
        int r = SSL_read(c->ssl, c->w->scratch, BATCH);
        if (r > 0) continue; /* bytes the app will never get: the connection is failing */
        int saved = errno;
        int e = SSL_get_error(c->ssl, r);
        errinfo_t alert;
        capture_ssl_error(c, r, e, saved, &alert);
        /* only an alert the server sent says more than the write error ("protocol is shutdown"
         * or the like would say less) */
        if (alert.kind == E_SSL && strstr(alert.reason, "ALERT")) *err = alert;
        break;
    }
    c->up_drained = saved_drained;
}

/* Bytes toward the server: SSL_write (or send for plain TCP).  Returns what was taken, or -1
 * after handling a failure. */
static ssize_t up_write(conn_t *c, const char *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        if (!c->ssl) {
            ssize_t n = send(c->up.fd, buf + done, len - done, MSG_NOSIGNAL);
            if (n > 0) {
                done += (size_t)n;
                if (done < len) { /* a short write: the socket buffer is full, no EAGAIN send */
                    c->up.writable = 0;
                    break;
                }
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                c->up.writable = 0;
                break;
            }
            if (n < 0 && errno == EINTR) continue;
            errinfo_t err = {.kind = E_OS, .code = errno};
            up_failed(c, &err);
            return -1;
        }
        errno = 0;
        int r = SSL_write(c->ssl, buf + done, (int)(len - done > INT32_MAX ? INT32_MAX : len - done));
        if (r > 0) {
            done += (size_t)r;
            c->write_wants_read = 0;
            continue;
        }
        int saved = errno;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_WRITE) {
            c->up.writable = 0;
            break;
        }
        if (e == SSL_ERROR_WANT_READ) {
            c->write_wants_read = 1;
            break;
        }
        errinfo_t err;
        capture_ssl_error(c, r, e, saved, &err);
        prefer_alert(c, &err);
        c->tls_dead = 1;
        up_failed(c, &err);
        return -1;
    }
    return (ssize_t)done;
}

static ssize_t app_write(conn_t *c, const char *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = send(c->app.fd, buf + done, len - done, MSG_NOSIGNAL);
        if (n > 0) {
            done += (size_t)n;
            if (done < len) { /* a short write: the socket buffer is full */
                c->app.writable = 0;
                break;
            }
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->app.writable = 0;
            break;
        }
        if (n < 0 && errno == EINTR) continue;
        app_failed(c, errno);
        return -1;
    }
    return (ssize_t)done;
}

/* Write what a side has pending; 1 when it is all out, 0 when some is left, -1 on failure. */
static int flush_side(conn_t *c, side_t *s) {
    size_t n = pend_size(&s->out);
    if (!n) return 1;
    ssize_t w = s == &c->up ? up_write(c, s->out.data + s->out.off, n) : app_write(c, s->out.data + s->out.off, n);
    if (w < 0) return -1;
    if (w > 0 && c->closing_since) c->closing_since = c->w->now; /* a flush that moves is not stuck */
    s->out.off += (size_t)w;
    if (pend_size(&s->out)) return 0;
    pend_free(&s->out);
    return 1;
}

static void close_both(conn_t *c) {
    if (!c->app.closed) c->app.flush_close = 1;
    if (!c->up.closed) c->up.flush_close = 1;
    if (!c->closing_since) c->closing_since = c->w->now;
}

/* The server failed (a reset, a TLS alert, a clean close where that means failure). */
static void up_failed(conn_t *c, errinfo_t *err) {
    c->tls_dead = 1;
    if (c->lost == 0 && c->failed_side == SIDE_NONE) {
        c->failed_side = SIDE_UP;
        c->err = *err;
        if (atomic_load_explicit(&c->from_up, memory_order_relaxed) == 0) {
            /* Before the server's first byte (TLS 1.3: our certificate was rejected right after the
             * handshake): Python says why in the app's protocol (Conn.fail_app), then the app side
             * is closed cleanly.  Stop everything until then. */
            side_close(c, &c->up, 0);
            c->state = ST_EARLY;
            event_t *ev = new_event(c, EV_EARLY);
            if (ev) {
                ev->err = *err;
                post(c->w->e, ev);
            }
            return;
        }
        /* mid-stream: pass it on as a reset, never as a clean end after half a reply */
        side_close(c, &c->up, 0);
        side_close(c, &c->app, 1);
        conn_finish(c);
        return;
    }
    side_close(c, &c->up, 0);
    if (c->app.closed) conn_finish(c);
    else c->app.flush_close = 1;
}

static void app_failed(conn_t *c, int err) {
    if (c->lost == 0 && c->failed_side == SIDE_NONE) {
        c->failed_side = SIDE_APP;
        c->err.kind = E_OS;
        c->err.code = err;
        side_close(c, &c->app, 0);
        side_close(c, &c->up, 1); /* the app's reset goes on to the server as a reset */
        conn_finish(c);
        return;
    }
    side_close(c, &c->app, 0);
    if (c->up.closed) conn_finish(c);
    else c->up.flush_close = 1;
}

/* The server sent its EOF (close_notify, or a TCP FIN). */
static void up_eof(conn_t *c) {
    c->up.eof = 1;
    if (c->reply_deadline && c->w->now <= c->reply_deadline && atomic_load(&c->from_up) == 0 && c->lost == 0 &&
        !c->app.eof) {
        /* A client-first protocol's server that closed without a byte right after the handshake,
         * while the app is still there, has failed (proxy/relay.py ClosedBeforeAnswer). */
        errinfo_t err = {.kind = E_SILENT};
        up_failed(c, &err);
        return;
    }
    if (!c->ssl) {
        /* plain TCP can half-close: pass the EOF on and keep relaying the other way */
        c->app.shut_wr = 1;
        if (c->app.eof) close_both(c);
        return;
    }
    /* TLS: the server side is over; the app gets what is buffered, then its close */
    side_close(c, &c->up, 0);
    c->app.flush_close = 1;
    if (!c->closing_since) c->closing_since = c->w->now;
}

static void app_eof(conn_t *c) {
    c->app.eof = 1;
    if (c->up.closed || c->up.eof) {
        close_both(c);
        return;
    }
    /* pass the EOF on: SHUT_WR for plain TCP, close_notify for TLS (tls_shut_wr) */
    c->up.shut_wr = 1;
    if (!c->ssl) return;
    /* TLS 1.2 has no half-close and a server may ignore close_notify: keep the server side while
     * it keeps answering, closed after LINGER_MS of silence (the linger) */
    c->linger_seen = atomic_load_explicit(&c->from_up, memory_order_relaxed);
    c->linger_deadline = c->w->now + LINGER_MS;
}

/* After the app's EOF went on as close_notify (tls_shut_wr), a server that closes on its own (after
 * MySQL's COM_QUIT, PostgreSQL's Terminate, Redis's QUIT) with our close_notify still unread in its
 * socket resets the connection, by TCP's rules; what it sent before is still read first.  That is
 * its close, as a FIN would have been, not a failure to report. */
static int reset_after_close_notify(conn_t *c, const errinfo_t *err) {
    return c->app.eof && c->ssl && (SSL_get_shutdown(c->ssl) & SSL_SENT_SHUTDOWN) && err->kind == E_OS &&
           (err->code == ECONNRESET || err->code == EPIPE);
}

/* The app's EOF, passed on over TLS: close_notify, and the server side stays open for reading.
 * TLS 1.3 defines this as a half-close (RFC 8446 6.1: the peer may go on sending); servers that
 * read it as "the client is gone" (Redis, most) close their side at once, so a closed app's server
 * connection is not held for the linger (a load of one connection per request would otherwise
 * keep a second's worth of them open at the server: with Redis's maxclients, refused
 * connections).  Returns -1 after handling a failure. */
static int tls_shut_wr(conn_t *c) {
    if (SSL_get_shutdown(c->ssl) & SSL_SENT_SHUTDOWN) {
        c->up.shut_wr = 0;
        return 0;
    }
    errno = 0;
    int r = SSL_shutdown(c->ssl);
    if (r >= 0) { /* 0: sent, the server's own close_notify not seen yet; 1: both */
        c->up.shut_wr = 0;
        return 0;
    }
    int saved = errno;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_WRITE) {
        c->up.writable = 0; /* tried again when the socket drains */
        return 0;
    }
    if (e == SSL_ERROR_WANT_READ) { /* cannot happen for a first close_notify; do not spin */
        c->up.shut_wr = 0;
        return 0;
    }
    errinfo_t err;
    capture_ssl_error(c, r, e, saved, &err);
    if (reset_after_close_notify(c, &err)) { /* gone already: reading finds its last bytes, then the end */
        c->up.shut_wr = 0;
        return 0;
    }
    up_failed(c, &err);
    return -1;
}

static int can_read_up(conn_t *c) {
    if (c->up.closed || c->up.eof || c->up.flush_close) return 0;
    if (!c->ssl) return c->up.readable;
    if (c->read_wants_write) return c->up.writable;
    return !c->up_drained || SSL_has_pending(c->ssl);
}

static int can_write_up(conn_t *c) {
    if (c->up.closed) return 0;
    if (c->ssl && c->write_wants_read) return !c->up_drained;
    return c->up.writable;
}

/* Move bytes until nothing moves.  Returns 1 if it stopped only because of its fairness bound. */
static int pump(conn_t *c) {
    worker_t *w = c->w;
    for (int round = 0; round < 32; round++) {
        int moved = 0;
        if (c->state != ST_RELAY) return 0;
        /* 1. what is pending, out first (backpressure: nothing is read while it waits) */
        if (pend_size(&c->up.out) && can_write_up(c)) {
            int r = flush_side(c, &c->up);
            if (r < 0) return 0;
            moved |= r;
        }
        if (pend_size(&c->app.out) && !c->app.closed && c->app.writable) {
            int r = flush_side(c, &c->app);
            if (r < 0) return 0;
            moved |= r;
        }
        /* 2. sides whose pending bytes are out: pass an EOF on, or close */
        if (!c->up.closed && !pend_size(&c->up.out)) {
            if (c->up.shut_wr && !c->ssl) {
                shutdown(c->up.fd, SHUT_WR);
                c->up.shut_wr = 0;
            } else if (c->up.shut_wr && can_write_up(c)) {
                if (tls_shut_wr(c) < 0) return 0;
            }
            if (c->up.flush_close) side_close(c, &c->up, 0);
        }
        if (!c->app.closed && !pend_size(&c->app.out)) {
            if (c->app.shut_wr) {
                shutdown(c->app.fd, SHUT_WR);
                c->app.shut_wr = 0;
            }
            if (c->app.flush_close) side_close(c, &c->app, 0);
        }
        if (c->app.closed && c->up.closed) {
            conn_finish(c);
            return 0;
        }
        if (c->app.flush_close && c->up.closed) {
            /* nothing more can arrive for the app: only its flush is left */
            if (!moved) return 0;
            continue;
        }
        /* 3. app -> server: one recv, written straight on from the scratch buffer */
        if (!pend_size(&c->up.out) && c->app.readable && !c->app.eof && !c->app.closed && !c->app.flush_close &&
            !c->up.closed && !c->up.flush_close) {
            ssize_t n = recv(c->app.fd, w->scratch, BATCH, 0);
            if (n > 0) {
                atomic_store_explicit(&c->from_app, atomic_load_explicit(&c->from_app, memory_order_relaxed) + (uint64_t)n,
                                      memory_order_relaxed);
                c->last_io = w->now;
                if (n < BATCH && !c->app.hup) c->app.readable = 0; /* a short read: the socket is empty */
                ssize_t took = can_write_up(c) ? up_write(c, w->scratch, (size_t)n) : 0;
                if (took < 0) return 0;
                if (took < n && pend_append(&c->up.out, w->scratch + took, (size_t)(n - took)) < 0) {
                    errinfo_t err = {.kind = E_OS, .code = ENOMEM};
                    up_failed(c, &err);
                    return 0;
                }
                moved = 1;
            } else if (n == 0) {
                app_eof(c);
                moved = 1;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                c->app.readable = 0;
            } else if (errno != EINTR) {
                app_failed(c, errno);
                return 0;
            }
        }
        if (c->state != ST_RELAY) return 0;
        /* 4. server -> app: SSL_read until the batch is full or the socket is drained */
        if (!pend_size(&c->app.out) && !c->app.closed && !c->app.flush_close && can_read_up(c)) {
            size_t n = 0;
            int ended = 0; /* 1: EOF, 2: failure */
            errinfo_t err = {0};
            while (n < BATCH) {
                if (!c->ssl) {
                    size_t want = BATCH - n;
                    ssize_t r = recv(c->up.fd, w->scratch + n, want, 0);
                    if (r > 0) {
                        n += (size_t)r;
                        if ((size_t)r < want && !c->up.hup) { /* a short read: the socket is empty */
                            c->up.readable = 0;
                            break;
                        }
                        continue;
                    }
                    if (r == 0) ended = 1;
                    else if (errno == EAGAIN || errno == EWOULDBLOCK) c->up.readable = 0;
                    else if (errno == EINTR) continue;
                    else {
                        ended = 2;
                        err.kind = E_OS;
                        err.code = errno;
                    }
                    break;
                }
                errno = 0;
                int r = SSL_read(c->ssl, w->scratch + n, (int)(BATCH - n));
                if (r > 0) {
                    n += (size_t)r;
                    c->read_wants_write = 0;
                    continue;
                }
                int saved = errno;
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ) {
                    c->read_wants_write = 0;
                    break;
                }
                if (e == SSL_ERROR_WANT_WRITE) {
                    c->read_wants_write = 1;
                    c->up.writable = 0;
                    break;
                }
                capture_ssl_error(c, r, e, saved, &err);
                ended = err.kind == E_EOF || reset_after_close_notify(c, &err) ? 1 : 2;
                break;
            }
            if (n > 0) {
                atomic_store_explicit(&c->from_up, atomic_load_explicit(&c->from_up, memory_order_relaxed) + n,
                                      memory_order_relaxed);
                c->last_io = w->now;
                if (atomic_load_explicit(&c->watching, memory_order_relaxed)) post_copy(c, w->scratch, n);
                ssize_t took = c->app.writable ? app_write(c, w->scratch, n) : 0;
                if (took < 0) return 0;
                if ((size_t)took < n && pend_append(&c->app.out, w->scratch + took, n - (size_t)took) < 0) {
                    app_failed(c, ENOMEM);
                    return 0;
                }
                moved = 1;
            }
            if (ended == 1) {
                up_eof(c);
                moved = 1;
            } else if (ended == 2) {
                up_failed(c, &err);
                return 0;
            }
        }
        if (!moved) return 0;
    }
    return 1; /* more to do: the worker comes back after the other connections had their turn */
}

/* READY: the relay has not started, but the server is read as the Python plane's Endpoint reads
 * it: what it says is held for the app (one batch at most), and if it goes away that is reported
 * at once (EV_LOST), so the session can tell the app in its protocol while it still holds the
 * app's socket (sessions/common.py _settle).  TLS 1.3 session tickets are consumed here too. */
static void post_data(conn_t *c);
static void ready_lost(conn_t *c, const errinfo_t *err, int eof);

static void ready_read(conn_t *c) {
    worker_t *w = c->w;
    pthread_mutex_lock(&c->io_lock); /* Python may be taking held bytes (Conn.take) */
    size_t held = pend_size(&c->app.out);
    if (held >= BATCH) c->hold_stopped = 1; /* in the same critical section as the check */
    pthread_mutex_unlock(&c->io_lock);
    /* hold at most a batch (then stop reading: the relay picks up from there), but keep reading
     * while less is held, so a close right after a banner is seen */
    if (held >= BATCH || !can_read_up(c)) return;
    size_t n = 0, room = BATCH - held;
    int ended = 0;
    errinfo_t err = {0};
    while (n < room) {
        ssize_t r;
        int saved = 0, e = 0;
        errno = 0;
        if (c->ssl) {
            r = SSL_read(c->ssl, w->scratch + n, (int)(room - n));
            saved = errno;
            if (r <= 0) e = SSL_get_error(c->ssl, (int)r);
        } else {
            r = recv(c->up.fd, w->scratch + n, room - n, 0);
            saved = errno;
        }
        if (r > 0) {
            n += (size_t)r;
            continue;
        }
        if (!c->ssl) {
            if (r == 0) ended = 1;
            else if (saved == EAGAIN || saved == EWOULDBLOCK) c->up.readable = 0;
            else if (saved != EINTR) { ended = 2; err.kind = E_OS; err.code = saved; }
            break;
        }
        if (e == SSL_ERROR_WANT_READ) break;
        if (e == SSL_ERROR_WANT_WRITE) { c->read_wants_write = 1; c->up.writable = 0; break; }
        capture_ssl_error(c, (int)r, e, saved, &err);
        ended = err.kind == E_EOF ? 1 : 2;
        break;
    }
    if (n) {
        atomic_store_explicit(&c->from_up, atomic_load_explicit(&c->from_up, memory_order_relaxed) + n,
                              memory_order_relaxed);
        pthread_mutex_lock(&c->io_lock);
        int rc = pend_append(&c->app.out, w->scratch, n);
        if (n == room && !ended) c->hold_stopped = 1; /* stopped by the limit, not by a drained socket */
        pthread_mutex_unlock(&c->io_lock);
        if (rc < 0) { ended = 2; err.kind = E_OS; err.code = ENOMEM; }
        else post_data(c);
    }
    if (!ended) return;
    ready_lost(c, &err, ended == 1);
}

/* The server went away (or failed) while READY: report it, keep what it said for Python. */
static void ready_lost(conn_t *c, const errinfo_t *err, int eof) {
    worker_t *w = c->w;
    if (!eof) c->tls_dead = 1;
    c->err = *err;
    pthread_mutex_lock(&c->io_lock);
    size_t held = pend_size(&c->app.out);
    pthread_mutex_unlock(&c->io_lock);
    if (eof) c->err.kind = held ? E_EOF : E_SILENT;
    side_close(c, &c->up, 0);
    c->state = ST_LOST;
    event_t *ev = new_event(c, EV_LOST);
    if (ev) {
        ev->err = c->err;
        ev->held = held;
        post(w->e, ev);
    }
}

/* --- In-band -----------------------------------------------------------------------------------
 * PostgreSQL and MySQL talk over TLS before the relay (the StartupMessage and first reply, the
 * MySQL login), driven by Python through an Endpoint-like interface (NativeUpstream in plane.py):
 *   - Conn.write: the bytes go to wbuf; CMD_WRITE moves them to up.out, written here while READY
 *     (a failure is a loss, reported as EV_LOST with the error, as ready_read reports one);
 *   - what the server says is held in app.out as before; each new chunk posts EV_DATA (no payload),
 *     and Python takes the bytes with Conn.take, under io_lock.  A full hold (one batch) stops
 *     reading until Python takes it (CMD_WAKE);
 *   - Conn.relay(..., upstream_pending, watch): the server bytes Python read go to the app first;
 *     with `watch` each server chunk relayed is also posted (EV_COPY) until Conn.unwatch().
 */
static void post_data(conn_t *c) {
    event_t *ev = new_event(c, EV_DATA);
    if (ev) post(c->w->e, ev);
}

/* a copy of a server chunk the relay passes to the app, for a watcher in Python (EV_COPY) */
static void post_copy(conn_t *c, const char *data, size_t n) {
    if (!n) return;
    event_t *ev = new_event(c, EV_COPY);
    if (!ev) return;
    ev->der = malloc(n);
    if (!ev->der) {
        free(ev);
        return;
    }
    memcpy(ev->der, data, n);
    ev->derlen = (int)n;
    post(c->w->e, ev);
}

/* Write Python's pending in-band bytes (up.out) while READY. */
static void ready_flush(conn_t *c) {
    while (pend_size(&c->up.out) && can_write_up(c)) {
        const char *buf = c->up.out.data + c->up.out.off;
        size_t len = pend_size(&c->up.out);
        errinfo_t err = {0};
        ssize_t took;
        errno = 0;
        if (!c->ssl) {
            took = send(c->up.fd, buf, len, MSG_NOSIGNAL);
            if (took < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->up.writable = 0;
                    return;
                }
                err.kind = E_OS;
                err.code = errno;
                pend_free(&c->up.out);
                ready_lost(c, &err, 0);
                return;
            }
        } else {
            int r = SSL_write(c->ssl, buf, (int)(len > INT32_MAX ? INT32_MAX : len));
            if (r <= 0) {
                int saved = errno;
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE) {
                    c->up.writable = 0;
                    return;
                }
                if (e == SSL_ERROR_WANT_READ) {
                    c->write_wants_read = 1;
                    return;
                }
                capture_ssl_error(c, r, e, saved, &err);
                prefer_alert(c, &err);
                pend_free(&c->up.out);
                ready_lost(c, &err, err.kind == E_EOF);
                return;
            }
            c->write_wants_read = 0;
            took = r;
        }
        c->up.out.off += (size_t)took;
        if (!pend_size(&c->up.out)) pend_free(&c->up.out);
    }
}

static void cmd_write(worker_t *w, conn_t *c) {
    (void)w;
    pthread_mutex_lock(&c->io_lock);
    pend_t data = c->wbuf;
    memset(&c->wbuf, 0, sizeof c->wbuf);
    pthread_mutex_unlock(&c->io_lock);
    if ((c->state != ST_HANDSHAKE && c->state != ST_READY) ||
        pend_append(&c->up.out, data.data ? data.data + data.off : "", pend_size(&data)) < 0) {
        pend_free(&data); /* the server is gone (EV_LOST said so) or the relay owns up.out now */
        return;
    }
    pend_free(&data);
    if (c->state == ST_READY) run_later(c);
}

static void conn_run(conn_t *c) {
    switch (c->state) {
    case ST_HANDSHAKE:
        do_handshake(c);
        break;
    case ST_READY:
        ready_flush(c); /* Python's in-band writes */
        if (c->state == ST_READY) ready_read(c);
        if (c->state == ST_READY && pend_size(&c->up.out)) ready_flush(c);
        break;
    case ST_RELAY:
        if (pump(c)) run_later(c);
        break;
    default:
        break; /* EARLY and LOST wait for Python; DONE is over */
    }
}

/* Timers: the idle timeout, the half-close linger, and a bound on a flush nobody reads. */
static void sweep(worker_t *w) {
    int64_t now = w->now;
    for (conn_t *c = w->conns, *next; c; c = next) {
        next = c->next;
        if (c->state != ST_RELAY) continue;
        if (c->closing_since) {
            int64_t bound = c->idle_ms > 0 ? c->idle_ms : 30000;
            if (now - c->closing_since >= bound) {
                side_close(c, &c->up, 0);
                side_close(c, &c->app, 0);
                conn_finish(c);
            }
            continue;
        }
        if (c->linger_deadline && now >= c->linger_deadline) {
            uint64_t seen = atomic_load_explicit(&c->from_up, memory_order_relaxed);
            if (seen != c->linger_seen && !c->up.closed) {
                c->linger_seen = seen;
                c->linger_deadline = now + LINGER_MS;
            } else {
                c->linger_deadline = 0;
                close_both(c);
                run_later(c);
                continue;
            }
        }
        if (c->idle_ms > 0 && now - c->last_io >= c->idle_ms) {
            c->idled = 1;
            close_both(c);
            run_later(c);
        }
    }
}

/* --- commands from Python ------------------------------------------------------------------- */

static void submit(worker_t *w, cmd_t *cmd) {
    pthread_mutex_lock(&w->lock);
    int was_empty = w->cmd_head == NULL;
    if (w->cmd_tail) w->cmd_tail->next = cmd;
    else w->cmd_head = cmd;
    w->cmd_tail = cmd;
    pthread_mutex_unlock(&w->lock);
    if (was_empty) {
        uint64_t one = 1;
        ssize_t r = write(w->wake_fd, &one, sizeof one);
        (void)r;
    }
}

static void cmd_start(worker_t *w, conn_t *c) {
    c->prev = NULL;
    c->next = w->conns;
    if (w->conns) w->conns->prev = c;
    w->conns = c;
    w->nconns++;
    c->last_io = w->now;
    if (conn_setup_tls(c) < 0 || side_register(w, &c->up) < 0) {
        capture_ssl_error(c, -1, SSL_ERROR_SSL, errno, &c->err);
        if (c->err.kind == E_EOF) {
            c->err.kind = E_OS;
            c->err.code = errno ? errno : EINVAL;
        }
        handshake_failed(c);
        return;
    }
    run_later(c);
}

/* cmd_relay's in-band part: the app's pending bytes go after Python's unwritten in-band writes;
 * the server bytes Python read (new_up_pending) go to the app before those still held, and the
 * held ones are shown to a watcher (Python saw the rest itself).  Counted as relay.py counts. */
static int relay_take_pending(conn_t *c) {
    if (!pend_size(&c->up.out)) {
        pend_free(&c->up.out);
        c->up.out = c->new_pending;
        memset(&c->new_pending, 0, sizeof c->new_pending);
    } else {
        int rc = pend_append(&c->up.out, c->new_pending.data ? c->new_pending.data + c->new_pending.off : "",
                             pend_size(&c->new_pending));
        pend_free(&c->new_pending);
        if (rc < 0) return -1;
    }
    pthread_mutex_lock(&c->io_lock);
    pend_t held = c->app.out;
    c->app.out = c->new_up_pending;
    memset(&c->new_up_pending, 0, sizeof c->new_up_pending);
    pthread_mutex_unlock(&c->io_lock);
    if (atomic_load(&c->watching)) post_copy(c, held.data ? held.data + held.off : "", pend_size(&held));
    int rc = pend_append(&c->app.out, held.data ? held.data + held.off : "", pend_size(&held));
    pend_free(&held);
    atomic_store_explicit(&c->from_up, (uint64_t)pend_size(&c->app.out), memory_order_relaxed);
    return rc;
}

static void cmd_relay(worker_t *w, conn_t *c) {
    int fd = c->new_app_fd;
    c->new_app_fd = -1;
    if (c->state != ST_READY && c->state != ST_LOST) { /* aborted meanwhile: the app side goes too */
        if (fd >= 0) close(fd);
        pend_free(&c->new_pending);
        pend_free(&c->new_up_pending);
        return;
    }
    int lost = c->state == ST_LOST; /* lost just before Python's relay call crossed our event */
    c->app.fd = fd;
    c->app.closed = 0;
    c->app.readable = c->app.writable = 1;
    /* what the handshake phase read from the app goes first (after in-band writes not yet out) */
    size_t app_pending = pend_size(&c->new_pending);
    if (relay_take_pending(c) < 0) {
        app_failed(c, ENOMEM);
        return;
    }
    atomic_store_explicit(&c->from_app, (uint64_t)app_pending, memory_order_relaxed); /* counted, as in relay.py */
    c->last_io = w->now;
    if (c->reply_deadline) c->reply_deadline += w->now;
    c->state = ST_RELAY;
    if (side_register(w, &c->app) < 0) {
        app_failed(c, errno);
        return;
    }
    if (lost) {
        pend_free(&c->up.out);
        if (pend_size(&c->app.out)) { /* what the server said, then its close */
            c->app.flush_close = 1;
            c->closing_since = w->now;
        } else { /* nothing: it failed before its first byte */
            c->failed_side = SIDE_UP;
            c->state = ST_EARLY;
            event_t *ev = new_event(c, EV_EARLY);
            if (ev) {
                ev->err = c->err;
                post(w->e, ev);
            }
            return;
        }
    }
    run_later(c);
}

static void cmd_fail_app(worker_t *w, conn_t *c) {
    (void)w;
    if (c->state != ST_EARLY) {
        pend_free(&c->fail_message);
        return;
    }
    c->app.out = c->fail_message;
    memset(&c->fail_message, 0, sizeof c->fail_message);
    c->app.flush_close = 1;
    c->closing_since = c->w->now;
    c->state = ST_RELAY;
    run_later(c);
}

static void cmd_close(worker_t *w, conn_t *c) {
    (void)w;
    if (c->state == ST_DONE) return;
    if (c->state == ST_HANDSHAKE) {
        c->tls_dead = 1;
        conn_finish(c);
        return;
    }
    if (c->state == ST_READY && pend_size(&c->up.out)) ready_flush(c); /* in-band writes, as far as they go now */
    if (c->state == ST_READY || c->state == ST_EARLY || c->state == ST_LOST) {
        conn_finish(c); /* graceful: close_notify toward the server */
        return;
    }
    close_both(c);
    run_later(c);
}

static void cmd_abort(worker_t *w, conn_t *c) {
    (void)w;
    if (c->state == ST_DONE) return;
    c->tls_dead = 1; /* no close_notify, no flush: asyncio's abort() */
    conn_finish(c);
}

static void take_commands(worker_t *w) {
    uint64_t v;
    ssize_t r = read(w->wake_fd, &v, sizeof v);
    (void)r;
    pthread_mutex_lock(&w->lock);
    cmd_t *cmd = w->cmd_head;
    w->cmd_head = w->cmd_tail = NULL;
    pthread_mutex_unlock(&w->lock);
    while (cmd) {
        cmd_t *next = cmd->next;
        conn_t *c = cmd->c;
        if (!c) {
            w->stopping = 1;
        } else if (!w->stopping) {
            switch (cmd->op) {
            case CMD_START: cmd_start(w, c); break;
            case CMD_RELAY: cmd_relay(w, c); break;
            case CMD_FAIL_APP: cmd_fail_app(w, c); break;
            case CMD_CLOSE: cmd_close(w, c); break;
            case CMD_ABORT: cmd_abort(w, c); break;
            case CMD_WRITE: cmd_write(w, c); break;
            case CMD_WAKE: if (c->state == ST_READY) run_later(c); break;
            }
        }
        if (c) conn_decref(c); /* each command holds a reference until it has run */
        free(cmd);
        cmd = next;
    }
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    /* Signals are Python's business (SIGTERM drains, SIGHUP reloads): never deliver one here. */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    struct epoll_event evs[256];
    w->now = now_ms();
    w->next_sweep = w->now + SWEEP_MS;
    while (!w->stopping) {
        int timeout = -1;
        if (w->run_head) timeout = 0;
        else if (w->nconns) timeout = (int)(w->next_sweep > w->now ? w->next_sweep - w->now : 0);
        int n = epoll_wait(w->epfd, evs, 256, timeout);
        if (n < 0 && errno != EINTR) break;
        w->now = now_ms();
        for (int i = 0; i < n; i++) {
            side_t *s = evs[i].data.ptr;
            if (!s) {
                take_commands(w);
                continue;
            }
            conn_t *c = s->c;
            if (c->state == ST_DONE || s->closed) continue;
            uint32_t e = evs[i].events;
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                s->readable = 1;
                if (s == &c->up) c->up_drained = 0;
            }
            if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->hup = 1;
            if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) s->writable = 1;
            run_later(c);
        }
        /* the run queue: each connection with news, once, in the order the news came */
        conn_t *c = w->run_head;
        w->run_head = w->run_tail = NULL;
        while (c) {
            conn_t *next = c->run_next;
            c->queued = 0;
            c->run_next = NULL;
            conn_run(c);
            c = next;
        }
        if (w->now >= w->next_sweep) {
            sweep(w);
            w->next_sweep = w->now + SWEEP_MS;
        }
        while (w->reap) {
            conn_t *d = w->reap;
            w->reap = d->next;
            d->next = NULL;
            conn_decref(d);
        }
    }
    /* stopping: whatever is left is aborted (Python's drain has already waited for it) */
    while (w->conns) {
        conn_t *c = w->conns;
        c->tls_dead = 1;
        conn_finish(c);
    }
    while (w->reap) {
        conn_t *d = w->reap;
        w->reap = d->next;
        conn_decref(d);
    }
    pthread_mutex_lock(&w->lock);
    cmd_t *cmd = w->cmd_head;
    w->cmd_head = w->cmd_tail = NULL;
    pthread_mutex_unlock(&w->lock);
    while (cmd) {
        cmd_t *next = cmd->next;
        if (cmd->c) conn_decref(cmd->c);
        free(cmd);
        cmd = next;
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Python types: Engine and Conn.
 */
typedef struct {
    PyObject_HEAD
    engine_t *e;
} EngineObject;

typedef struct {
    PyObject_HEAD
    conn_t *c;
    EngineObject *engine;
} ConnObject;

static PyTypeObject EngineType, ConnType;

static void engine_stop(engine_t *e) {
    if (!e || e->closed) return;
    e->closed = 1;
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        if (!w->started) continue;
        cmd_t *cmd = calloc(1, sizeof *cmd);
        if (cmd) submit(w, cmd); /* c == NULL: stop */
        else w->stopping = 1;
    }
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        if (!w->started) continue;
        Py_BEGIN_ALLOW_THREADS
        pthread_join(w->thread, NULL);
        Py_END_ALLOW_THREADS
        w->started = 0;
    }
}

static void engine_free(engine_t *e) {
    if (!e) return;
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        if (w->epfd >= 0) close(w->epfd);
        if (w->wake_fd >= 0) close(w->wake_fd);
        free(w->scratch);
        pthread_mutex_destroy(&w->lock);
    }
    event_t *ev = e->ev_head;
    while (ev) {
        event_t *next = ev->next;
        free(ev->der);
        free(ev);
        ev = next;
    }
    if (e->notify_fd >= 0) close(e->notify_fd);
    pthread_mutex_destroy(&e->ev_lock);
    free(e->workers);
    free(e);
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"threads", NULL};
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i", kwlist, &threads)) return -1;
    if (threads < 1 || threads > 64) {
        PyErr_SetString(PyExc_ValueError, "threads must be between 1 and 64");
        return -1;
    }
    if (self->e) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialised");
        return -1;
    }
    engine_t *e = calloc(1, sizeof *e);
    if (!e) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&e->ev_lock, NULL);
    e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->workers = calloc((size_t)threads, sizeof *e->workers);
    e->nworkers = threads;
    if (e->notify_fd < 0 || !e->workers) goto fail;
    for (int i = 0; i < threads; i++) {
        worker_t *w = &e->workers[i];
        w->e = e;
        pthread_mutex_init(&w->lock, NULL);
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->scratch = malloc(BATCH);
        if (w->epfd < 0 || w->wake_fd < 0 || !w->scratch) goto fail;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wake_fd, &ev) < 0) goto fail;
    }
    for (int i = 0; i < threads; i++) {
        worker_t *w = &e->workers[i];
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) goto fail;
        w->started = 1;
        char name[16]; /* top(1) -H, /proc/PID/task/TID/comm: which threads are the workers */
        snprintf(name, sizeof name, "dbmtls-w%u", (unsigned)i % 64u); /* threads <= 64 */
        pthread_setname_np(w->thread, name);
    }
    self->e = e;
    return 0;
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    engine_stop(e);
    engine_free(e);
    return -1;
}

static void Engine_dealloc(EngineObject *self) {
    engine_stop(self->e);
    engine_free(self->e);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_fileno(EngineObject *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(self->e ? self->e->notify_fd : -1);
}

static PyObject *Engine_close(EngineObject *self, PyObject *unused) {
    (void)unused;
    engine_stop(self->e);
    Py_RETURN_NONE;
}

static PyObject *errinfo_tuple(const errinfo_t *err) {
    return Py_BuildValue("(ilsss)", err->kind, err->code, err->lib, err->reason, err->text);
}

/* Everything the workers reported since the last call, oldest first:
 *   (id, "handshake", ok, version, cipher, peer_der | None, error)
 *   (id, "early", error)
 *   (id, "lost", error, held)   the server went away before the relay; `held` bytes it sent wait
 *   (id, "data")                 before the relay: more server bytes are held (Conn.take)
 *   (id, "copy", bytes)          a server chunk the relay passed on, while watched (Conn.relay)
 *   (id, "closed", failed_side, error, idled, bytes_from_app, bytes_from_upstream)
 * where error is (kind, code, lib, reason, text). */
static PyObject *Engine_events(EngineObject *self, PyObject *unused) {
    (void)unused;
    engine_t *e = self->e;
    if (!e) return PyList_New(0);
    uint64_t v;
    ssize_t r = read(e->notify_fd, &v, sizeof v);
    (void)r;
    pthread_mutex_lock(&e->ev_lock);
    event_t *ev = e->ev_head;
    e->ev_head = e->ev_tail = NULL;
    pthread_mutex_unlock(&e->ev_lock);
    PyObject *out = PyList_New(0);
    while (ev) {
        event_t *next = ev->next;
        PyObject *item = NULL;
        if (out) {
            PyObject *err = errinfo_tuple(&ev->err);
            if (ev->kind == EV_HANDSHAKE) {
                PyObject *der = ev->der ? PyBytes_FromStringAndSize((const char *)ev->der, ev->derlen)
                                        : (Py_INCREF(Py_None), Py_None);
                item = Py_BuildValue("(KsNssNNNN)", (unsigned long long)ev->id, "handshake",
                                     PyBool_FromLong(ev->ok), ev->version, ev->cipher, der, err,
                                     PyBool_FromLong(ev->resumed), PyBool_FromLong(ev->offered));
            } else if (ev->kind == EV_EARLY) {
                item = Py_BuildValue("(KsN)", (unsigned long long)ev->id, "early", err);
            } else if (ev->kind == EV_DATA) {
                item = Py_BuildValue("(Ks)", (unsigned long long)ev->id, "data");
                Py_DECREF(err);
            } else if (ev->kind == EV_COPY) {
                item = Py_BuildValue("(Ksy#)", (unsigned long long)ev->id, "copy", (const char *)ev->der,
                                     (Py_ssize_t)ev->derlen);
                Py_DECREF(err);
            } else if (ev->kind == EV_LOST) {
                item = Py_BuildValue("(KsNn)", (unsigned long long)ev->id, "lost", err, (Py_ssize_t)ev->held);
            } else {
                item = Py_BuildValue("(KsiNNKK)", (unsigned long long)ev->id, "closed", ev->failed_side, err,
                                     PyBool_FromLong(ev->idled), (unsigned long long)ev->from_app,
                                     (unsigned long long)ev->from_up);
            }
            if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
            Py_XDECREF(item);
        }
        free(ev->der);
        free(ev);
        ev = next;
    }
    return out;
}

static int conn_command(ConnObject *self, int op) {
    engine_t *e = self->engine->e;
    if (!e || e->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the native engine is closed");
        return -1;
    }
    cmd_t *cmd = calloc(1, sizeof *cmd);
    if (!cmd) {
        PyErr_NoMemory();
        return -1;
    }
    cmd->op = op;
    cmd->c = self->c;
    atomic_fetch_add(&self->c->refs, 1);
    submit(self->c->w, cmd);
    return 0;
}

/* Engine.connect(fd, context | None, server_name, check_hostname, want_peer_cert) -> Conn
 * Takes `fd` (a connected TCP socket, non-blocking) and starts the TLS handshake on it. */
static PyObject *Engine_connect(EngineObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "context", "server_name", "check_hostname", "want_peer_cert", NULL};
    int fd, check_host = 1, want_peer = 0;
    PyObject *ctxobj;
    const char *server_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOz|pp", kwlist, &fd, &ctxobj, &server_name, &check_host, &want_peer))
        return NULL;
    engine_t *e = self->e;
    /* the descriptor is ours from here on: every failure closes it */
    if (!e || e->closed) {
        close(fd);
        PyErr_SetString(PyExc_RuntimeError, "the native engine is closed");
        return NULL;
    }
    if (ctxobj != Py_None && !PyObject_TypeCheck(ctxobj, &ContextType)) {
        close(fd);
        PyErr_SetString(PyExc_TypeError, "context must be a dbmtls._native.Context or None");
        return NULL;
    }
    conn_t *c = calloc(1, sizeof *c);
    ConnObject *obj = PyObject_New(ConnObject, &ConnType);
    if (!c || !obj) {
        close(fd);
        free(c);
        if (obj) {
            obj->c = NULL;
            obj->engine = NULL;
            Py_DECREF(obj);
        }
        return PyErr_NoMemory();
    }
    atomic_init(&c->refs, 2); /* Python's Conn and the worker */
    atomic_init(&c->from_app, 0);
    atomic_init(&c->from_up, 0);
    atomic_init(&c->watching, 0);
    pthread_mutex_init(&c->io_lock, NULL);
    c->id = ++e->next_id;
    c->w = &e->workers[e->next_worker];
    e->next_worker = (e->next_worker + 1) % e->nworkers;
    c->app.c = c->up.c = c;
    c->app.fd = -1;
    c->app.closed = 1; /* not ours until Conn.relay */
    c->up.fd = fd;
    c->up.readable = c->up.writable = 1;
    c->new_app_fd = -1;
    c->state = ST_HANDSHAKE;
    c->check_host = check_host;
    c->want_peer_cert = want_peer;
    if (ctxobj != Py_None) {
        c->ctx = ((ContextObject *)ctxobj)->ctx;
        SSL_CTX_up_ref(c->ctx);
    }
    if (server_name) c->server_name = strdup(server_name);
    obj->c = c;
    obj->engine = self;
    Py_INCREF(self);
    cmd_t *cmd = calloc(1, sizeof *cmd);
    if (!cmd) {
        close(fd);
        c->up.fd = -1;
        atomic_fetch_sub(&c->refs, 1); /* the worker never gets it */
        Py_DECREF(obj);
        return PyErr_NoMemory();
    }
    cmd->op = CMD_START;
    cmd->c = c;
    atomic_fetch_add(&c->refs, 1); /* the command's own, dropped once it has run (take_commands) */
    submit(c->w, cmd);
    return (PyObject *)obj;
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The eventfd that becomes readable when events wait."},
    {"events", (PyCFunction)Engine_events, METH_NOARGS, "Take every pending event."},
    {"connect", (PyCFunction)(void (*)(void))Engine_connect, METH_VARARGS | METH_KEYWORDS,
     "Take a connected socket and start the TLS handshake on it."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Stop the workers; open connections are closed."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dbmtls._native.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Native worker threads that run TLS handshakes and relays.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static void Conn_dealloc(ConnObject *self) {
    if (self->c) conn_decref(self->c);
    Py_XDECREF(self->engine);
    PyObject_Free(self);
}

static PyObject *Conn_get_id(ConnObject *self, void *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(self->c->id);
}

static PyObject *Conn_get_from_app(ConnObject *self, void *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&self->c->from_app, memory_order_relaxed));
}

static PyObject *Conn_get_from_up(ConnObject *self, void *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&self->c->from_up, memory_order_relaxed));
}

/* Conn.relay(app_fd, pending, reply_within_ms, idle_ms): relay between the app socket and the
 * handshaken server connection; `pending` (what the handshake phase read from the app) goes to
 * the server first.  Takes `app_fd`. */
static PyObject *Conn_relay(ConnObject *self, PyObject *args) {
    int fd, watch = 0;
    Py_buffer pending, up_pending = {0};
    long long reply_ms, idle_ms;
    if (!PyArg_ParseTuple(args, "iy*LL|y*p", &fd, &pending, &reply_ms, &idle_ms, &up_pending, &watch)) return NULL;
    conn_t *c = self->c;
    /* in-band: server bytes Python read go to the app first; `watch`: copies of the server's chunks */
    int up_rc = !c->relay_called && up_pending.buf && up_pending.len
                    ? pend_append(&c->new_up_pending, up_pending.buf, (size_t)up_pending.len)
                    : 0;
    if (up_pending.buf) PyBuffer_Release(&up_pending);
    if (up_rc < 0) {
        PyBuffer_Release(&pending);
        close(fd);
        return PyErr_NoMemory();
    }
    if (c->relay_called) {
        PyBuffer_Release(&pending);
        PyErr_SetString(PyExc_RuntimeError, "relay already started");
        return NULL;
    }
    c->relay_called = 1;
    /* set before the command: the mutex of the queue orders these writes before the worker's reads */
    if (pending.len && pend_append(&c->new_pending, pending.buf, (size_t)pending.len) < 0) {
        PyBuffer_Release(&pending);
        return PyErr_NoMemory();
    }
    PyBuffer_Release(&pending);
    c->new_app_fd = fd;
    atomic_store(&c->watching, watch);
    c->reply_deadline = reply_ms > 0 ? reply_ms : 0; /* made absolute by the worker */
    c->idle_ms = idle_ms;
    if (conn_command(self, CMD_RELAY) < 0) {
        c->new_app_fd = -1;
        close(fd);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Conn.fail_app(message): after an "early" event, write what the app is told, then close it. */
static PyObject *Conn_fail_app(ConnObject *self, PyObject *args) {
    Py_buffer msg;
    if (!PyArg_ParseTuple(args, "y*", &msg)) return NULL;
    int rc = pend_append(&self->c->fail_message, msg.buf, (size_t)msg.len);
    PyBuffer_Release(&msg);
    if (rc < 0) return PyErr_NoMemory();
    if (conn_command(self, CMD_FAIL_APP) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Conn.take_held(): after a "lost" event, the bytes the server sent before it went (the worker
 * does not touch them any more once it has reported the loss). */
static PyObject *Conn_take(ConnObject *self, PyObject *unused);
static PyObject *Conn_take_held(ConnObject *self, PyObject *unused) { return Conn_take(self, unused); }

/* --- In-band, Python's side (see "In-band" above) --- */

/* Conn.write(data): toward the server (SSL_write by the worker) before the relay. */
static PyObject *Conn_write(ConnObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    conn_t *c = self->c;
    if (c->relay_called) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "the relay owns the connection");
        return NULL;
    }
    pthread_mutex_lock(&c->io_lock);
    int rc = pend_append(&c->wbuf, data.buf, (size_t)data.len);
    pthread_mutex_unlock(&c->io_lock);
    PyBuffer_Release(&data);
    if (rc < 0) return PyErr_NoMemory();
    if (conn_command(self, CMD_WRITE) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Conn.take(): the server bytes held now (possibly b""), before the relay or after "lost". */
static PyObject *Conn_take(ConnObject *self, PyObject *unused) {
    (void)unused;
    conn_t *c = self->c;
    if (c->relay_called) return PyBytes_FromStringAndSize("", 0);
    pthread_mutex_lock(&c->io_lock);
    size_t n = pend_size(&c->app.out);
    PyObject *out = PyBytes_FromStringAndSize(c->app.out.data ? c->app.out.data + c->app.out.off : "", (Py_ssize_t)n);
    int wake = 0;
    if (out) {
        pend_free(&c->app.out);
        wake = c->hold_stopped;
        c->hold_stopped = 0;
    }
    pthread_mutex_unlock(&c->io_lock);
    /* a full hold stopped the worker reading: it may go on (a no-op once the server is gone).
     * Not "n >= BATCH": the worker may have stopped at a full hold that Python took in two
     * parts (half before the worker's read, half after), each less than a batch. */
    if (wake && conn_command(self, CMD_WAKE) < 0) PyErr_Clear();
    return out;
}

static PyObject *Conn_get_held(ConnObject *self, void *unused) {
    (void)unused;
    conn_t *c = self->c;
    if (c->relay_called) return PyLong_FromLong(0);
    pthread_mutex_lock(&c->io_lock);
    size_t n = pend_size(&c->app.out);
    pthread_mutex_unlock(&c->io_lock);
    return PyLong_FromSize_t(n);
}

/* Conn.unwatch(): no more copies of the server's chunks (copies already posted still arrive). */
static PyObject *Conn_unwatch(ConnObject *self, PyObject *unused) {
    (void)unused;
    atomic_store(&self->c->watching, 0);
    Py_RETURN_NONE;
}

static PyObject *Conn_close(ConnObject *self, PyObject *unused) {
    (void)unused;
    if (conn_command(self, CMD_CLOSE) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Conn_abort(ConnObject *self, PyObject *unused) {
    (void)unused;
    if (conn_command(self, CMD_ABORT) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyGetSetDef Conn_getset[] = {
    {"id", (getter)Conn_get_id, NULL, "The connection's id in events.", NULL},
    {"bytes_from_app", (getter)Conn_get_from_app, NULL, "Plaintext bytes read from the app.", NULL},
    {"bytes_from_upstream", (getter)Conn_get_from_up, NULL, "Plaintext bytes read from the server.", NULL},
    {"held", (getter)Conn_get_held, NULL, "Server bytes held before the relay (Conn.take).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Conn_methods[] = {
    {"relay", (PyCFunction)Conn_relay, METH_VARARGS, "Start relaying (takes the app's descriptor)."},
    {"fail_app", (PyCFunction)Conn_fail_app, METH_VARARGS, "Tell the app, then close it (after 'early')."},
    {"take_held", (PyCFunction)Conn_take_held, METH_NOARGS, "After 'lost': what the server sent before."},
    {"write", (PyCFunction)Conn_write, METH_VARARGS, "Before the relay: bytes toward the server."},
    {"take", (PyCFunction)Conn_take, METH_NOARGS, "Before the relay: the server bytes held now."},
    {"unwatch", (PyCFunction)Conn_unwatch, METH_NOARGS, "Stop the copies of the server's chunks."},
    {"close", (PyCFunction)Conn_close, METH_NOARGS, "Close gracefully (flushing what is pending)."},
    {"abort", (PyCFunction)Conn_abort, METH_NOARGS, "Close both sides now."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dbmtls._native.Conn",
    .tp_basicsize = sizeof(ConnObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One server connection in the native engine (made by Engine.connect).",
    .tp_dealloc = (destructor)Conn_dealloc,
    .tp_getset = Conn_getset,
    .tp_methods = Conn_methods,
};

/* --------------------------------------------------------------------------------------------- */
/* cert_fields(der): the few fields of a certificate the control plane reads (subject, serial,
 * validity, subjectAltNames), decoded by the OpenSSL the process has loaded anyway, so that a
 * running sidecar need not import cryptography (about 10 MiB of RSS: docs/memory.md).  Anything
 * unusual (a non-string name attribute, a duplicate SAN extension, a time OpenSSL cannot convert)
 * raises dbmtls._native.Error, and dbmtls/tls/certfields.py then asks cryptography, so the
 * answers never differ from cryptography's, only the cost.
 *
 * Returns (serial_hex, not_before, not_after, subject, sans): times as seconds since the epoch
 * (UTC), subject as a tuple of RDNs in DER order, each a tuple of (dotted OID, str), sans None
 * without the extension, else a tuple of ("dns" | "uri", str) and ("ip", packed bytes). */

static PyObject *asn1_time_epoch(const ASN1_TIME *t) {
    struct tm tm;
    if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return NULL;
    return PyLong_FromLongLong((long long)timegm(&tm));
}

static PyObject *name_rdns(const X509_NAME *name) {
    int n = X509_NAME_entry_count(name);
    PyObject *rdns = PyList_New(0), *rdn = NULL;
    int set = -1;
    if (!rdns) return NULL;
    for (int i = 0; i < n; i++) {
        const X509_NAME_ENTRY *ent = X509_NAME_get_entry(name, i);
        const ASN1_STRING *val = X509_NAME_ENTRY_get_data(ent);
        switch (ASN1_STRING_type(val)) {
        case V_ASN1_UTF8STRING: case V_ASN1_PRINTABLESTRING: case V_ASN1_IA5STRING:
        case V_ASN1_BMPSTRING: case V_ASN1_UNIVERSALSTRING: case V_ASN1_T61STRING:
        case V_ASN1_VISIBLESTRING: case V_ASN1_NUMERICSTRING:
            break;
        default: /* cryptography shows other types as #hex: leave those to it */
            goto unusual;
        }
        char oid[128];
        if (OBJ_obj2txt(oid, sizeof oid, X509_NAME_ENTRY_get_object(ent), 1) <= 0) goto unusual;
        unsigned char *utf8 = NULL;
        int len = ASN1_STRING_to_UTF8(&utf8, val);
        if (len < 0) goto unusual;
        PyObject *pair = Py_BuildValue("(ss#)", oid, (const char *)utf8, (Py_ssize_t)len);
        OPENSSL_free(utf8);
        if (!pair) goto fail;
        if (X509_NAME_ENTRY_set(ent) != set) { /* a new RDN (a SET of attributes) */
            if (rdn && PyList_Append(rdns, rdn) < 0) goto fail_pair;
            Py_CLEAR(rdn);
            if (!(rdn = PyList_New(0))) goto fail_pair;
            set = X509_NAME_ENTRY_set(ent);
        }
        if (PyList_Append(rdn, pair) < 0) goto fail_pair;
        Py_DECREF(pair);
        continue;
    fail_pair:
        Py_DECREF(pair);
        goto fail;
    }
    if (rdn && PyList_Append(rdns, rdn) < 0) goto fail;
    Py_XDECREF(rdn);
    PyObject *out = PyList_AsTuple(rdns);
    Py_DECREF(rdns);
    return out; /* the RDNs are lists inside the tuple: read-only use in Python */
unusual:
    PyErr_SetString(NativeError, "unusual name attribute");
fail:
    Py_XDECREF(rdn);
    Py_DECREF(rdns);
    return NULL;
}

static PyObject *cert_sans(X509 *x) {
    int crit = -1;
    GENERAL_NAMES *gens = X509_get_ext_d2i(x, NID_subject_alt_name, &crit, NULL);
    if (!gens) {
        if (crit == -1) Py_RETURN_NONE; /* no such extension */
        PyErr_SetString(NativeError, "subjectAltName extension not decodable or repeated");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < sk_GENERAL_NAME_num(gens); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
        PyObject *item = NULL;
        if (g->type == GEN_DNS || g->type == GEN_URI) {
            const ASN1_STRING *v = g->type == GEN_DNS ? g->d.dNSName : g->d.uniformResourceIdentifier;
            /* IA5String: ASCII; cryptography refuses anything else, so must we */
            const unsigned char *d = ASN1_STRING_get0_data(v);
            int len = ASN1_STRING_length(v);
            for (int k = 0; k < len; k++)
                if (d[k] > 0x7f) {
                    PyErr_SetString(NativeError, "non-ASCII subjectAltName");
                    Py_CLEAR(out);
                    break;
                }
            if (!out) break;
            item = Py_BuildValue("(ss#)", g->type == GEN_DNS ? "dns" : "uri", (const char *)d, (Py_ssize_t)len);
        } else if (g->type == GEN_IPADD) {
            item = Py_BuildValue("(sy#)", "ip", (const char *)ASN1_STRING_get0_data(g->d.iPAddress),
                                 (Py_ssize_t)ASN1_STRING_length(g->d.iPAddress));
        } else {
            continue; /* other kinds (email, directory name, ...) are never matched */
        }
        if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    GENERAL_NAMES_free(gens);
    if (!out) return NULL;
    PyObject *t = PyList_AsTuple(out);
    Py_DECREF(out);
    return t;
}

static PyObject *mod_cert_fields(PyObject *mod, PyObject *args) {
    (void)mod;
    Py_buffer der;
    if (!PyArg_ParseTuple(args, "y*", &der)) return NULL;
    const unsigned char *p = der.buf;
    X509 *x = d2i_X509(NULL, &p, der.len);
    int whole = x && p == (const unsigned char *)der.buf + der.len;
    PyBuffer_Release(&der);
    ERR_clear_error();
    if (!whole) {
        X509_free(x);
        PyErr_SetString(NativeError, "not one DER certificate");
        return NULL;
    }
    PyObject *serial = NULL, *nb = NULL, *na = NULL, *subject = NULL, *sans = NULL, *out = NULL;
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    if (hex) serial = PyUnicode_FromString(hex);
    OPENSSL_free(hex);
    BN_free(bn);
    if (!serial) {
        if (!PyErr_Occurred()) PyErr_SetString(NativeError, "serial number");
        goto done;
    }
    if (!(nb = asn1_time_epoch(X509_get0_notBefore(x))) || !(na = asn1_time_epoch(X509_get0_notAfter(x)))) {
        if (!PyErr_Occurred()) PyErr_SetString(NativeError, "validity time");
        goto done;
    }
    if (!(subject = name_rdns(X509_get_subject_name(x)))) goto done;
    if (!(sans = cert_sans(x))) goto done;
    out = PyTuple_Pack(5, serial, nb, na, subject, sans);
done:
    ERR_clear_error();
    Py_XDECREF(serial);
    Py_XDECREF(nb);
    Py_XDECREF(na);
    Py_XDECREF(subject);
    Py_XDECREF(sans);
    X509_free(x);
    return out;
}

static PyMethodDef module_methods[] = {
    {"cert_fields", mod_cert_fields, METH_VARARGS, "Serial, validity, subject and SANs of a DER certificate."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dbmtls._native", "dbmtls's native data plane (docs/native.md).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&ContextType) < 0 || PyType_Ready(&EngineType) < 0 || PyType_Ready(&ConnType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    NativeError = PyErr_NewException("dbmtls._native.Error", PyExc_ValueError, NULL);
    sess_cache_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, sess_cache_free);
    Py_INCREF(&ContextType);
    Py_INCREF(&EngineType);
    Py_INCREF(&ConnType);
    if (PyModule_AddObject(m, "Error", NativeError) < 0 ||
        PyModule_AddObject(m, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "Conn", (PyObject *)&ConnType) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
        PyModule_AddIntConstant(m, "E_OS", E_OS) < 0 || PyModule_AddIntConstant(m, "E_SSL", E_SSL) < 0 ||
        PyModule_AddIntConstant(m, "E_VERIFY", E_VERIFY) < 0 || PyModule_AddIntConstant(m, "E_EOF", E_EOF) < 0 ||
        PyModule_AddIntConstant(m, "E_SILENT", E_SILENT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
