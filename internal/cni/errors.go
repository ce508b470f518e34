package cni

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/containernetworking/cni/pkg/types"
)

// DebugEnv turns on debug logging to stderr. The plugin is otherwise silent:
// stdout carries the result, and runtimes show stderr as the error.
const DebugEnv = "UNDERPASS_CNI_DEBUG"

var log = newLogger()

func newLogger() *slog.Logger {
	if v := os.Getenv(DebugEnv); v == "" || v == "0" || v == "false" {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// cniError turns any error into the CNI error the runtime shows. A
// *types.Error keeps its code; when it was wrapped, the message keeps the
// context too (skel would unwrap it to the bare inner error). Everything
// else is an internal error (999) with the full message.
func cniError(err error) error {
	if err == nil {
		return nil
	}
	var te *types.Error
	if errors.As(err, &te) {
		if error(te) == err {
			return te
		}
		return types.NewError(te.Code, err.Error(), "")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}

func errorf(code uint, format string, args ...any) *types.Error {
	return types.NewError(code, fmt.Sprintf(format, args...), "")
}
