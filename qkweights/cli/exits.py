"""The exit codes of the command line: 0 ok, 1 findings, 2 usage or input error, 130 interrupted, 141 stdout closed,
143 terminated."""

EXIT_OK = 0
EXIT_FINDINGS = 1  # the command ran, and found something: non-finite weights, a failed check
EXIT_USAGE = 2  # a QkError: the user's input or environment; also an internal error
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_BROKEN_PIPE = 141  # stdout's reader left mid-way (`… | head`), as a shell reports a SIGPIPE death
EXIT_TERMINATED = 143  # SIGTERM (kill PID), handled as Ctrl-C: the resume state is kept, workers are stopped
