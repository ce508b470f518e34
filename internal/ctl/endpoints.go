package ctl

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// EndpointView is one endpoint in `underpassctl endpoints`: the endpoint
// with the names people read in place of the datapath's values.
type EndpointView struct {
	datapath.Endpoint
	Name string `json:"endpoint"` // Endpoint.Name()
	Mode string `json:"mode"`
	MAC  string `json:"mac"`
	// Attach is how its programs are attached: tcx, legacy, none, defunct.
	Attach string `json:"attach"`
}

func runEndpoints(_ context.Context, env Env, o *options, dp *loader.Objects) error {
	eps, err := endpoints(dp)
	if err != nil {
		return err
	}
	if o.output == "json" {
		if eps == nil {
			eps = []EndpointView{} // [] rather than null for scripts
		}
		return writeJSON(env.Stdout, eps)
	}
	if len(eps) == 0 {
		fmt.Fprintln(env.Stdout, "no endpoints registered")
		return nil
	}
	now := time.Now()
	w := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ENDPOINT\tPOD\tIFACE\tPARENT\tMODE\tMAC\tADDRESSES\tPROGRAMS\tAGE\tID")
	for _, e := range eps {
		var addrs []string
		for _, a := range e.Addrs {
			addrs = append(addrs, a.String())
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", e.Name, orDash(e.PodRef()), e.IfName,
			orDash(e.ParentName), e.Mode, e.MAC, joinOr(addrs, "-"), e.Attach, age(e.Created, now), e.ID)
	}
	return w.Flush()
}

func endpoints(dp *loader.Objects) ([]EndpointView, error) {
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return nil, err
	}
	var out []EndpointView
	for id, ep := range eps {
		out = append(out, EndpointView{Endpoint: ep, Name: ep.Name(), Mode: ep.Mode.String(), MAC: ep.MAC.String(),
			Attach: endpointMode(id, ep.Netns, ep.Ifindex)})
	}
	slices.SortFunc(out, func(a, b EndpointView) int { return compareEndpoints(&a.Endpoint, &b.Endpoint) })
	return out, nil
}

// compareEndpoints orders endpoints the way people look for them: by
// namespace, pod, then interface.
func compareEndpoints(a, b *datapath.Endpoint) int {
	if c := strings.Compare(a.PodNamespace, b.PodNamespace); c != 0 {
		return c
	}
	if c := strings.Compare(a.PodName, b.PodName); c != 0 {
		return c
	}
	if c := strings.Compare(a.Name(), b.Name()); c != 0 {
		return c
	}
	return int(a.ID) - int(b.ID)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
