/* A chat with a memory model from C, through memlayer's C ABI.
 *
 *   cc -I include examples/c/chat.c -L target/release -lmemlayer_capi \
 *      -Wl,-rpath,target/release -o chat
 *   ./chat models/demo-pkm 25 "The company that employs Zovom Tudeind is"
 *
 * Opens the model directory with a quarter of its bank resident, streams the
 * answer to the first line break, then prints the paging counters. With no
 * prompt on the command line it reads one prompt per line from stdin. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "memlayer.h"

/* Called with each new piece of text: print it as it comes. */
static int32_t on_piece(const char *piece, size_t len, void *user) {
    (void)user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* go on; nonzero would stop after this piece */
}

static int fail(const char *what) {
    const char *why = memlayer_last_error();
    fprintf(stderr, "chat: %s: %s\n", what, why ? why : "unknown error");
    return 1;
}

static int ask(MemlayerModel *model, const char *prompt) {
    MemlayerSampling sampling = memlayer_sampling_default();
    sampling.max_tokens = 24;
    sampling.stop = "\n"; /* the answer to the end of its line */
    MemlayerResult result;
    char *text = NULL;
    fputs(prompt, stdout);
    MemlayerStatus status =
        memlayer_generate(model, prompt, &sampling, on_piece, NULL, &text, &result);
    if (status != MEMLAYER_STATUS_OK) return fail("generate");
    if (text == NULL || strchr(text, '\n') == NULL) putchar('\n');
    memlayer_string_free(text);
    fprintf(stderr, "[%u prompt + %u tokens in %.2f s]\n", result.prompt_tokens, result.tokens,
            result.seconds);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [BUDGET_PERCENT [PROMPT]]\n", argv[0]);
        return 2;
    }
    fprintf(stderr, "%s\n", memlayer_version_string());
    MemlayerOpenOptions options = memlayer_open_options_default();
    options.budget_percent = argc > 2 ? atof(argv[2]) : 25.0;
    MemlayerModel *model = NULL;
    if (memlayer_open(argv[1], &options, &model) != MEMLAYER_STATUS_OK) return fail("open");

    int rc = 0;
    if (argc > 3) {
        rc = ask(model, argv[3]);
    } else {
        char line[4096];
        while (rc == 0 && fgets(line, sizeof line, stdin) != NULL) {
            line[strcspn(line, "\r\n")] = '\0';
            if (line[0] != '\0') rc = ask(model, line);
        }
    }

    MemlayerStats stats;
    if (rc == 0 && memlayer_stats(model, &stats) == MEMLAYER_STATUS_OK) {
        fprintf(stderr, "hit rate %.1f%% | %llu pages resident of %llu | %.2f MiB streamed\n",
                stats.hit_rate * 100.0, (unsigned long long)stats.resident_pages,
                (unsigned long long)stats.bank_pages, stats.bytes_streamed / 1048576.0);
    }
    memlayer_close(model);
    return rc;
}
