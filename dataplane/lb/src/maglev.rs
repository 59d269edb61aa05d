//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table a Maglev Service's
//! flows are hashed into. Computed here, in userspace, from backend identities and a seed only,
//! so every node builds the same table, and removing one of N backends remaps about 1/N of it.

use std::net::SocketAddrV4;

/// Default table size: a prime well above 100 × the backends a Service usually has.
pub const DEFAULT_TABLE_SIZE: u32 = weir_lb_common::MAGLEV_MAX as u32;

/// Default seed; every node of a cluster must use the same one.
pub const DEFAULT_SEED: u64 = 0x7765_6972_6c62_3031;

/// Whether `n` can be a Maglev table size: a prime that fits the BPF map value.
pub fn valid_table_size(n: u32) -> bool {
    n >= 2
        && n as usize <= weir_lb_common::MAGLEV_MAX
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The table for `backends` (indexed by slot): entry `i` is the slot flows hashing to `i` use.
/// `size` must satisfy [`valid_table_size`]; empty input gives an empty table.
pub fn table(backends: &[SocketAddrV4], size: u32, seed: u64) -> Vec<u32> {
    let m = size as u64;
    if backends.is_empty() || m < 2 {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let name = b.to_string();
            let offset = fnv1a(seed, name.as_bytes()) % m;
            let skip = fnv1a(seed.rotate_left(17) ^ 0x5bd1_e995, name.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (slot, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[slot] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[slot] += 1;
                c = (offset + next[slot] * skip) % m;
            }
            entry[c as usize] = slot as u32;
            next[slot] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV alone mixes the last bytes poorly; finish with a multiply-xorshift.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new([10, 244, 0, i].into(), 8080))
            .collect()
    }

    #[test]
    fn sizes_must_be_prime_and_fit() {
        assert!(valid_table_size(16381));
        assert!(valid_table_size(251));
        assert!(!valid_table_size(16383));
        assert!(!valid_table_size(65537));
        assert!(!valid_table_size(1));
    }

    #[test]
    fn balanced_and_identical_from_the_same_seed() {
        let b = backends(7);
        let t = table(&b, DEFAULT_TABLE_SIZE, DEFAULT_SEED);
        assert_eq!(t, table(&b, DEFAULT_TABLE_SIZE, DEFAULT_SEED));
        assert_ne!(t, table(&b, DEFAULT_TABLE_SIZE, DEFAULT_SEED + 1));
        let mut counts = [0usize; 7];
        t.iter().for_each(|&s| counts[s as usize] += 1);
        let (min, max) = (
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0),
        );
        assert!(max - min <= 1, "unbalanced {counts:?}");
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let before = backends(5);
        let after: Vec<_> = before
            .iter()
            .copied()
            .filter(|b| b.ip().octets()[3] != 3)
            .collect();
        let t0 = table(&before, DEFAULT_TABLE_SIZE, DEFAULT_SEED);
        let t1 = table(&after, DEFAULT_TABLE_SIZE, DEFAULT_SEED);
        let moved = t0
            .iter()
            .zip(&t1)
            .filter(|&(&a, &b)| before[a as usize] != after[b as usize])
            .count() as f64
            / t0.len() as f64;
        // 1/5 must move (the removed backend's share); Maglev adds a little disruption on top.
        assert!((0.2..0.26).contains(&moved), "moved {moved}");
    }
}
