/* HTTPS client with OpenSSL linked in statically (libssl.a, libcrypto.a): no libssl.so in its
 * memory map, so the tracer must find SSL_read/SSL_write in the executable itself.
 *
 * Usage: static_tls_client PORT COUNT WAIT_MS
 * Connects to 127.0.0.1:PORT, completes the handshake, waits WAIT_MS (so the tracer can find
 * this new program first), then sends COUNT kept-alive GET /bytes/N requests with SSL_write
 * and reads each response whole with SSL_read. Prints one status code per line. */
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int read_response(SSL *ssl) {
    char buf[65536];
    size_t have = 0;
    char *end = NULL;
    while (!(end = memmem(buf, have, "\r\n\r\n", 4))) {
        int n = SSL_read(ssl, buf + have, (int)(sizeof(buf) - have));
        if (n <= 0) return -1;
        have += (size_t)n;
    }
    int status = atoi(buf + 9);
    char *cl = strcasestr(buf, "content-length:");
    long length = cl && cl < end ? atol(cl + 15) : 0;
    size_t body = have - (size_t)(end + 4 - buf);
    while ((long)body < length) {
        int n = SSL_read(ssl, buf, sizeof(buf));
        if (n <= 0) return -1;
        body += (size_t)n;
    }
    return status;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT COUNT WAIT_MS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), count = atoi(argv[2]), wait_ms = atoi(argv[3]);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        perror("connect");
        return 1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    usleep((useconds_t)wait_ms * 1000);
    for (int i = 0; i < count; i++) {
        char req[256];
        int len = snprintf(req, sizeof(req),
                           "GET /bytes/%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n", 200 + i, port);
        if (SSL_write(ssl, req, len) != len) return 1;
        int status = read_response(ssl);
        if (status < 0) return 1;
        printf("%d\n", status);
        fflush(stdout);
    }
    SSL_shutdown(ssl);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return 0;
}
