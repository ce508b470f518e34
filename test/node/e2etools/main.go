// Command e2etools is the curl, nc, dig and getent that the upstream e2e tests exec in
// their agnhost pods (the published agnhost image ships both; the one built
// here from agnhost's source has no distribution under it). It is
// multi-call, by the name it is run as, and knows only what e2e.test's
// sig-network tests pass:
//
//	curl [-g] [-q] [-s] [-i] [-o FILE] [-w '%{http_code}'] [--max-time S|-m S] [--connect-timeout S] [--interface ADDR] URL
//	nc [-w S] [-u|-t] [-v] [-z] HOST PORT    (stdin is sent; the reply is printed)
//
// Exit codes follow curl's: 7 could not connect, 28 timed out, 3 bad URL.
// As sh it is busybox's sh with nc defined as a function (busybox's sh
// would run its own nc applet, which has no -u, whatever PATH says).
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name == "e2etools" && len(args) > 0 {
		name, args = args[0], args[1:]
	}
	switch name {
	case "curl":
		os.Exit(curl(args, os.Stdout, os.Stderr))
	case "nc":
		os.Exit(nc(args, os.Stdin, os.Stdout, os.Stderr))
	case "dig":
		os.Exit(dig(args, os.Stdout, os.Stderr))
	case "getent":
		os.Exit(getent(args, os.Stdout, os.Stderr))
	case "sh":
		// busybox's sh runs its own applets before anything on PATH, and
		// its nc has no -u: a function comes first, so define one.
		// The script follows -c, after any other options (`sh -x -c ...`).
		for i := 0; i+1 < len(args) && strings.HasPrefix(args[i], "-"); i++ {
			if args[i] == "-c" {
				args[i+1] = `nc() { /usr/bin/nc "$@"; }; ` + args[i+1]
				break
			}
		}
		err := syscall.Exec("/bin/busybox", append([]string{"sh"}, args...), os.Environ())
		fmt.Fprintf(os.Stderr, "sh (e2etools): %v\n", err)
		os.Exit(127)
	}
	fmt.Fprintf(os.Stderr, "e2etools: run as curl, nc, dig, getent or sh, not %q\n", name)
	os.Exit(2)
}

func seconds(s string) (time.Duration, error) {
	f, err := strconv.ParseFloat(s, 64)
	return time.Duration(f * float64(time.Second)), err
}

func curl(args []string, stdout, stderr io.Writer) int {
	var (
		url, out, format       string
		include, silent        bool
		maxTime, connectTimout time.Duration
		local                  netip.Addr
	)
	for i := 0; i < len(args); i++ {
		a := args[i]
		next := func() string {
			if i+1 < len(args) {
				i++
				return args[i]
			}
			return ""
		}
		var err error
		switch a {
		case "-g", "-q", "--globoff":
		case "-s", "--silent":
			silent = true
		case "-i", "--include":
			include = true
		case "-o", "--output":
			out = next()
		case "-w", "--write-out":
			format = next()
		case "-m", "--max-time":
			maxTime, err = seconds(next())
		case "--connect-timeout":
			connectTimout, err = seconds(next())
		case "--interface":
			if local, err = netip.ParseAddr(next()); err != nil {
				err = fmt.Errorf("an address (no interface names here): %w", err)
			}
		default:
			if strings.HasPrefix(a, "-") {
				fmt.Fprintf(stderr, "curl (e2etools): unsupported option %s\n", a)
				return 2
			}
			url = a
		}
		if err != nil {
			fmt.Fprintf(stderr, "curl (e2etools): %s: %v\n", a, err)
			return 2
		}
	}
	if !strings.Contains(url, "://") {
		url = "http://" + url
	}
	ctx := context.Background()
	if maxTime > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, maxTime)
		defer cancel()
	}
	dialer := &net.Dialer{Timeout: connectTimout}
	if local.IsValid() {
		dialer.LocalAddr = &net.TCPAddr{IP: local.AsSlice()}
	}
	client := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext, DisableKeepAlives: true}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		fmt.Fprintf(stderr, "curl (e2etools): %v\n", err)
		return 3
	}
	resp, err := client.Do(req)
	if err != nil {
		if !silent {
			fmt.Fprintf(stderr, "curl (e2etools): %v\n", err)
		}
		var ne net.Error
		if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
			if format != "" {
				fmt.Fprint(stdout, strings.ReplaceAll(format, "%{http_code}", "000"))
			}
			return 28
		}
		if format != "" {
			fmt.Fprint(stdout, strings.ReplaceAll(format, "%{http_code}", "000"))
		}
		return 7
	}
	defer resp.Body.Close()
	w := stdout
	if out != "" && out != "-" {
		f, err := os.Create(out)
		if err != nil {
			fmt.Fprintf(stderr, "curl (e2etools): %v\n", err)
			return 23
		}
		defer f.Close()
		w = f
	}
	if include {
		head, _ := httputil.DumpResponse(resp, false)
		w.Write(head) //nolint:errcheck // as curl: best effort to the output
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return 56
	}
	if format != "" {
		fmt.Fprint(stdout, strings.ReplaceAll(format, "%{http_code}", strconv.Itoa(resp.StatusCode)))
	}
	return 0
}

func nc(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	proto, timeout := "tcp", 5*time.Second
	var rest []string
	var verbose, zero bool
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "-u":
			proto = "udp"
		case a == "-t":
			proto = "tcp"
		case a == "-v":
			verbose = true
		case a == "-z":
			zero = true
		case a == "-vz" || a == "-zv":
			verbose, zero = true, true
		case a == "-w" && i+1 < len(args):
			d, err := seconds(args[i+1])
			if err != nil {
				fmt.Fprintf(stderr, "nc (e2etools): -w: %v\n", err)
				return 2
			}
			timeout, i = d, i+1
		case strings.HasPrefix(a, "-w"):
			d, err := seconds(strings.TrimPrefix(a, "-w"))
			if err != nil {
				fmt.Fprintf(stderr, "nc (e2etools): -w: %v\n", err)
				return 2
			}
			timeout = d
		case strings.HasPrefix(a, "-"):
			fmt.Fprintf(stderr, "nc (e2etools): unsupported option %s\n", a)
			return 2
		default:
			rest = append(rest, a)
		}
	}
	if len(rest) != 2 {
		fmt.Fprintln(stderr, "usage: nc [-w S] [-u|-t] [-v] [-z] HOST PORT")
		return 2
	}
	c, err := net.DialTimeout(proto, net.JoinHostPort(rest[0], rest[1]), timeout)
	if err != nil {
		fmt.Fprintf(stderr, "nc (e2etools): %v\n", err)
		return 1
	}
	defer c.Close()
	if verbose {
		// As OpenBSD nc, on stderr (e2e.test looks at stdout only).
		fmt.Fprintf(stderr, "Connection to %s %s port [%s] succeeded!\n", rest[0], rest[1], proto)
	}
	if zero {
		return 0
	}
	msg, _ := io.ReadAll(bufio.NewReader(stdin))
	if _, err := c.Write(msg); err != nil {
		fmt.Fprintf(stderr, "nc (e2etools): %v\n", err)
		return 1
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite() //nolint:errcheck // the peer sees EOF, or the read below ends it
	}
	c.SetReadDeadline(time.Now().Add(timeout)) //nolint:errcheck // a conn always takes a deadline
	io.Copy(stdout, c)                         //nolint:errcheck // as nc: until EOF or the timeout
	return 0
}
