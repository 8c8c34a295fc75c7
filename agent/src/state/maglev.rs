//! Maglev consistent hashing: the lookup table that maps a hash of the client to a backend.
//!
//! This is the population algorithm of section 3.4 of Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer" (NSDI 2016). Each backend gets a permutation of
//! the table's entries from two hashes of its address (an offset and a skip); backends take
//! turns claiming their next preferred entry that is still free until the table is full.
//! Every backend ends up with the same number of entries (give or take one), and removing a
//! backend moves few entries that belonged to the others.
//!
//! The hashes are fixed (FNV-1a 64 followed by a 64-bit finaliser), not std's randomly
//! keyed hasher, so the table is the same on every node, run, platform and Rust version: a
//! client keeps reaching the same backend when the agent restarts.

use std::net::{IpAddr, SocketAddr};

/// Seed of the hash that picks a backend's first entry.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
/// Seed of the hash that picks the stride through the table.
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// Builds a Maglev lookup table of `size` entries for `backends`.
///
/// Entry `i` of the result is an index into `backends`. The assignment depends only on the
/// *set* of backends, not on their order: the table is computed on a canonically sorted copy
/// and mapped back to the given indices. `size` should be a prime (the kernel uses
/// [`MAGLEV_TABLE_SIZE`](mycel_common::service::MAGLEV_TABLE_SIZE)); other sizes still give a
/// full table, just with less even shares. Backends should be distinct; only the first
/// 65,536 are used (a slot index is a `u16`). No backends, or a size of zero, give an empty
/// table.
pub fn table(backends: &[SocketAddr], size: usize) -> Vec<u16> {
    // Slots beyond u16::MAX cannot be named in the table; the kernel never has that many
    // (MAX_BACKENDS_PER_SERVICE is far below it).
    let usable = backends.len().min(usize::from(u16::MAX) + 1);
    if usable == 0 || size == 0 {
        return Vec::new();
    }
    let mut order: Vec<(SocketAddr, u16)> = backends[..usable]
        .iter()
        .zip(0..=u16::MAX)
        .map(|(addr, slot)| (*addr, slot))
        .collect();
    order.sort_unstable();

    let m = size as u64;
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|(addr, _)| {
            let offset = hash(addr, OFFSET_SEED) % m;
            let skip = if m > 1 {
                hash(addr, SKIP_SEED) % (m - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();

    const EMPTY: u32 = u32::MAX;
    let mut entries = vec![EMPTY; size];
    let mut next = vec![0u64; order.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut candidate = None;
            while next[i] < m {
                // (offset + j * skip) mod m, without overflow for any table size.
                let c = ((u128::from(offset) + u128::from(next[i]) * u128::from(skip))
                    % u128::from(m)) as usize;
                next[i] += 1;
                if entries[c] == EMPTY {
                    candidate = Some(c);
                    break;
                }
            }
            // With a prime size every permutation covers the whole table, so a backend always
            // finds a free entry while any is left. With other sizes a permutation may be
            // exhausted early: fall back to the first free entry so the loop still ends.
            let c = match candidate {
                Some(c) => c,
                None => match entries.iter().position(|&e| e == EMPTY) {
                    Some(c) => c,
                    None => break 'fill,
                },
            };
            entries[c] = i as u32;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    entries
        .into_iter()
        .map(|i| order.get(i as usize).map_or(0, |&(_, slot)| slot))
        .collect()
}

/// FNV-1a 64 over the seed, the address family, the address and the port (big-endian),
/// then the MurmurHash3 finaliser so that addresses differing in one byte spread over the
/// whole range.
fn hash(addr: &SocketAddr, seed: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    eat(&seed.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            eat(&[4]);
            eat(&ip.octets());
        }
        IpAddr::V6(ip) => {
            eat(&[6]);
            eat(&ip.octets());
        }
    }
    eat(&addr.port().to_be_bytes());
    fmix64(h)
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use mycel_common::service::MAGLEV_TABLE_SIZE;

    use super::*;

    const M: usize = MAGLEV_TABLE_SIZE as usize;

    fn backends(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    fn counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in table {
            c[usize::from(s)] += 1;
        }
        c
    }

    /// The table as addresses, so that tables of different backend lists compare.
    fn resolved(backends: &[SocketAddr], table: &[u16]) -> Vec<SocketAddr> {
        table.iter().map(|&s| backends[usize::from(s)]).collect()
    }

    #[test]
    fn empty() {
        assert!(table(&[], M).is_empty());
        assert!(table(&backends(3), 0).is_empty());
    }

    #[test]
    fn single_backend_takes_everything() {
        let t = table(&backends(1), M);
        assert_eq!(t.len(), M);
        assert!(t.iter().all(|&s| s == 0));
    }

    #[test]
    fn every_entry_is_a_valid_index() {
        for n in [1, 2, 3, 7, 64, 1024] {
            let t = table(&backends(n), M);
            assert_eq!(t.len(), M);
            assert!(t.iter().all(|&s| usize::from(s) < n), "n = {n}");
        }
    }

    #[test]
    fn shares_differ_by_at_most_one_entry() {
        for n in [2, 3, 10, 40, 100, 1000, 1024] {
            let c = counts(&table(&backends(n), M), n);
            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(max - min <= 1, "n = {n}: min {min}, max {max}");
        }
    }

    #[test]
    fn shares_within_five_percent_of_even() {
        for n in [2, 10, 25, 40] {
            let even = M as f64 / n as f64;
            for (i, &c) in counts(&table(&backends(n), M), n).iter().enumerate() {
                let deviation = (c as f64 - even).abs() / even;
                assert!(
                    deviation < 0.05,
                    "n = {n}, backend {i}: {c} entries, even {even:.1}"
                );
            }
        }
    }

    #[test]
    fn independent_of_input_order() {
        let b = backends(50);
        let mut shuffled = b.clone();
        shuffled.reverse();
        shuffled.swap(3, 17);
        assert_eq!(
            resolved(&b, &table(&b, M)),
            resolved(&shuffled, &table(&shuffled, M))
        );
    }

    /// Pins the hash so that a change to it, which would move every client, is deliberate.
    #[test]
    fn stable_across_runs() {
        let b = [
            SocketAddr::from(([10, 0, 0, 1], 80)),
            SocketAddr::from(([10, 0, 0, 2], 80)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, 443)),
        ];
        let t = table(&b, M);
        assert_eq!(&t[..16], &[0, 0, 2, 1, 1, 0, 2, 0, 2, 2, 2, 0, 2, 0, 1, 1]);
        assert_eq!(hash(&b[0], OFFSET_SEED), 0x2e04_670b_62d4_0b2f);
    }

    /// Removing one of `n` backends: the entries it held move, and a few of the others'.
    /// Returns how many of the others' entries moved.
    fn disruption(n: usize, removed: usize) -> usize {
        let all = backends(n);
        let before = resolved(&all, &table(&all, M));
        let mut fewer = all.clone();
        let gone = fewer.remove(removed);
        let after = resolved(&fewer, &table(&fewer, M));
        before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != gone && b != a)
            .count()
    }

    #[test]
    fn removing_a_backend_moves_few_other_entries() {
        // Measured over every choice of the removed backend: at most 61 entries (1.5% of
        // the table) for n = 10, 109 (2.7%) for n = 50. The paper reports the same order.
        for (n, percent) in [(10, 2), (50, 3)] {
            let worst = (0..n).map(|r| disruption(n, r)).max().unwrap();
            assert!(
                worst * 100 <= percent * M,
                "n = {n}: {worst} of {M} entries of other backends moved"
            );
        }
    }

    #[test]
    fn adding_the_backend_back_restores_the_table() {
        let all = backends(50);
        let before = resolved(&all, &table(&all, M));
        let mut fewer = all.clone();
        let gone = fewer.remove(20);
        assert_ne!(resolved(&fewer, &table(&fewer, M)), before);
        fewer.push(gone);
        assert_eq!(resolved(&fewer, &table(&fewer, M)), before);
    }

    #[test]
    fn other_sizes_still_fill_the_table() {
        for size in [1, 2, 4, 100, 4096] {
            let t = table(&backends(7), size);
            assert_eq!(t.len(), size);
            assert!(t.iter().all(|&s| s < 7));
        }
    }
}
