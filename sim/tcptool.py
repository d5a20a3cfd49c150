"""Tiny TCP tools the testbed runs inside its namespaces, by path (`python sim/tcptool.py ...`), so that they start
in milliseconds: they import nothing from Tandem.

    sink HOST PORT             accept one connection, read to EOF, answer with what arrived and when
    source HOST PORT NBYTES    send NBYTES, print the goodput in bit/s the sink measured
    probe HOST PORT            exit 0 if something accepts connections there
"""
import socket
import sys
import time


def sink(host: str, port: int) -> None:
    """Times the bytes after the first chunk, from its arrival to the last one's: the link's steady goodput,
    without connection set-up or the final acknowledgement."""
    with socket.create_server((host, port)) as srv:
        conn, _ = srv.accept()
        with conn:
            first = conn.recv(1 << 20)
            t0 = t1 = time.perf_counter()
            total = len(first)
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
                t1 = time.perf_counter()
            conn.sendall(f"{total} {total - len(first)} {t1 - t0}".encode())


def source(host: str, port: int, nbytes: int) -> None:
    block = bytes(1 << 16)
    for _ in range(400):  # the sink may still be starting
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise SystemExit(f"cannot connect to {host}:{port}")
    with conn:
        conn.settimeout(600)
        left = nbytes
        while left > 0:
            left -= conn.send(block[:min(left, len(block))])
        conn.shutdown(socket.SHUT_WR)
        got, timed, seconds = conn.recv(128).decode().split()
    if int(got) != nbytes:
        raise SystemExit(f"sink received {got} of {nbytes} bytes")
    print(f"{int(timed) * 8 / float(seconds):.1f}")


def probe(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError:
        sys.exit(1)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sink":
        sink(args[0], int(args[1]))
    elif cmd == "source":
        source(args[0], int(args[1]), int(args[2]))
    elif cmd == "probe":
        probe(args[0], int(args[1]))
    else:
        raise SystemExit(__doc__)
