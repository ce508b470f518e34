package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// The DNS specs of e2e.test exec, in their agnhost and glibc-dns-testing
// containers:
//
//	dig +notcp|+tcp +noall +answer +search NAME [A|AAAA|SRV|PTR|CNAME]
//	dig +short NAME [TYPE]
//	getent hosts NAME
//
// dig asks the first nameserver of /etc/resolv.conf (the cluster DNS),
// with its search list when +search is given, and prints the answer
// section: one record per line, or only the data with +short. Nothing else
// of dig is here.

type resolvConf struct {
	server string
	search []string
	ndots  int
}

func readResolvConf(path string) (resolvConf, error) {
	rc := resolvConf{ndots: 1}
	f, err := os.Open(path)
	if err != nil {
		return rc, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "nameserver":
			if rc.server == "" {
				rc.server = f[1]
			}
		case "search":
			rc.search = f[1:]
		case "options":
			for _, o := range f[1:] {
				if n, ok := strings.CutPrefix(o, "ndots:"); ok {
					rc.ndots, _ = strconv.Atoi(n)
				}
			}
		}
	}
	if rc.server == "" {
		return rc, errors.New("no nameserver in " + path)
	}
	return rc, s.Err()
}

// candidates are the names tried for name, in the resolver's order.
func (rc resolvConf) candidates(name string, search bool) []string {
	if strings.HasSuffix(name, ".") {
		return []string{name}
	}
	var out []string
	if search && strings.Count(name, ".") < rc.ndots {
		for _, d := range rc.search {
			out = append(out, name+"."+strings.TrimSuffix(d, ".")+".")
		}
	}
	out = append(out, name+".")
	if search && strings.Count(name, ".") >= rc.ndots {
		for _, d := range rc.search {
			out = append(out, name+"."+strings.TrimSuffix(d, ".")+".")
		}
	}
	return out
}

var qtypes = map[string]dnsmessage.Type{
	"A": dnsmessage.TypeA, "AAAA": dnsmessage.TypeAAAA, "SRV": dnsmessage.TypeSRV,
	"PTR": dnsmessage.TypePTR, "CNAME": dnsmessage.TypeCNAME, "TXT": dnsmessage.TypeTXT,
}

func dig(args []string, stdout, stderr io.Writer) int {
	var tcp, search, short bool
	var name string
	qtype := dnsmessage.TypeA
	for _, a := range args {
		switch {
		case a == "+tcp":
			tcp = true
		case a == "+notcp":
			tcp = false
		case a == "+search":
			search = true
		case a == "+short":
			short = true
		case a == "+noall" || a == "+answer":
			// The answer section is all this dig prints.
		case strings.HasPrefix(a, "+"):
			fmt.Fprintf(stderr, "dig (e2etools): unsupported option %s\n", a)
			return 1
		case qtypes[strings.ToUpper(a)] != 0 && name != "":
			qtype = qtypes[strings.ToUpper(a)]
		default:
			name = a
		}
	}
	if name == "" {
		fmt.Fprintln(stderr, "usage: dig [+tcp|+notcp] [+search] [+short] [+noall +answer] NAME [TYPE]")
		return 1
	}
	rc, err := readResolvConf("/etc/resolv.conf")
	if err != nil {
		fmt.Fprintf(stderr, "dig (e2etools): %v\n", err)
		return 9
	}
	for _, n := range rc.candidates(name, search) {
		answers, err := query(rc.server, n, qtype, tcp)
		if err != nil {
			fmt.Fprintf(stderr, "dig (e2etools): %s: %v\n", n, err)
			return 9
		}
		if len(answers) == 0 {
			continue
		}
		for _, rr := range answers {
			data := rrData(rr)
			if short {
				fmt.Fprintln(stdout, data)
			} else {
				fmt.Fprintf(stdout, "%s\t%d\tIN\t%s\t%s\n", rr.Header.Name, rr.Header.TTL, strings.TrimPrefix(rr.Header.Type.String(), "Type"), data)
			}
		}
		return 0
	}
	return 0 // as dig: no answer is not an error
}

func rrData(rr dnsmessage.Resource) string {
	switch b := rr.Body.(type) {
	case *dnsmessage.AResource:
		return netip.AddrFrom4(b.A).String()
	case *dnsmessage.AAAAResource:
		return netip.AddrFrom16(b.AAAA).String()
	case *dnsmessage.CNAMEResource:
		return b.CNAME.String()
	case *dnsmessage.PTRResource:
		return b.PTR.String()
	case *dnsmessage.SRVResource:
		return fmt.Sprintf("%d %d %d %s", b.Priority, b.Weight, b.Port, b.Target)
	case *dnsmessage.TXTResource:
		return strconv.Quote(strings.Join(b.TXT, ""))
	}
	return rr.Body.GoString()
}

// query asks server for name's records of type t and returns the answer
// section (nil for NXDOMAIN or no data).
func query(server, name string, t dnsmessage.Type, tcp bool) ([]dnsmessage.Resource, error) {
	n, err := dnsmessage.NewName(name)
	if err != nil {
		return nil, err
	}
	id := uint16(rand.Uint32())
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: n, Type: t, Class: dnsmessage.ClassINET}},
	}
	msg, err := q.Pack()
	if err != nil {
		return nil, err
	}
	network := "udp"
	if tcp {
		network = "tcp"
	}
	c, err := net.DialTimeout(network, net.JoinHostPort(server, "53"), 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var reply []byte
	if tcp {
		if _, err := c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(msg)))); err != nil {
			return nil, err
		}
		if _, err := c.Write(msg); err != nil {
			return nil, err
		}
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return nil, err
		}
		reply = make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, reply); err != nil {
			return nil, err
		}
	} else {
		if _, err := c.Write(msg); err != nil {
			return nil, err
		}
		reply = make([]byte, 65535)
		k, err := c.Read(reply)
		if err != nil {
			return nil, err
		}
		reply = reply[:k]
	}
	var m dnsmessage.Message
	if err := m.Unpack(reply); err != nil {
		return nil, err
	}
	if m.ID != id {
		return nil, fmt.Errorf("reply id %d, asked %d", m.ID, id)
	}
	if m.RCode != dnsmessage.RCodeSuccess && m.RCode != dnsmessage.RCodeNameError {
		return nil, fmt.Errorf("%s", m.RCode)
	}
	return m.Answers, nil
}

// getent hosts NAME: /etc/hosts first, then the cluster DNS (A, with the
// search list), as glibc's "files dns".
func getent(args []string, stdout, stderr io.Writer) int {
	if len(args) != 2 || args[0] != "hosts" {
		fmt.Fprintln(stderr, "usage: getent hosts NAME")
		return 1
	}
	name := args[1]
	if b, err := os.ReadFile("/etc/hosts"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(strings.SplitN(line, "#", 2)[0])
			for _, h := range f[min(1, len(f)):] {
				if h == name {
					fmt.Fprintln(stdout, strings.Join(f, " "))
					return 0
				}
			}
		}
	}
	rc, err := readResolvConf("/etc/resolv.conf")
	if err != nil {
		return 2
	}
	for _, n := range rc.candidates(name, true) {
		answers, err := query(rc.server, n, dnsmessage.TypeA, false)
		if err != nil {
			return 2
		}
		for _, rr := range answers {
			if a, ok := rr.Body.(*dnsmessage.AResource); ok {
				fmt.Fprintf(stdout, "%s %s\n", netip.AddrFrom4(a.A), name)
				return 0
			}
		}
	}
	return 2
}
