//go:build linux

package main

import (
	"bufio"
	"net/http"
	"strconv"
	"strings"
)

// samples is a scraped /metrics page.
type samples []sample

type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// metrics scrapes the agent; an error gives no samples.
func (d *demoRun) metrics() samples {
	code, body, err := d.agent.Get("/metrics")
	if err != nil || code != http.StatusOK {
		return nil
	}
	return parseMetrics(body)
}

// parseMetrics reads the Prometheus text format (enough of it for the
// demo: no escaped quotes or commas inside label values).
func parseMetrics(body string) samples {
	var out samples
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' {
			continue
		}
		s := sample{labels: map[string]string{}}
		rest := l
		if i := strings.IndexByte(l, '{'); i >= 0 {
			j := strings.LastIndexByte(l, '}')
			if j < i {
				continue
			}
			s.name = l[:i]
			for kv := range strings.SplitSeq(l[i+1:j], ",") {
				k, v, ok := strings.Cut(kv, "=")
				if ok {
					s.labels[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"`)
				}
			}
			rest = strings.TrimSpace(l[j+1:])
		} else {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			s.name, rest = f[0], f[1]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		s.value = v
		out = append(out, s)
	}
	return out
}

// sum adds the samples of name whose label k is v (k == "": all).
func (s samples) sum(name, k, v string) float64 {
	var t float64
	for _, x := range s {
		if x.name == name && (k == "" || x.labels[k] == v) {
			t += x.value
		}
	}
	return t
}

func (s samples) has(name string) bool {
	for _, x := range s {
		if x.name == name {
			return true
		}
	}
	return false
}
