//! Times as `host dlq` reads and prints them: `--since` as a duration ago,
//! an RFC 3339 time or Unix milliseconds, and record times in UTC RFC 3339.
//! The civil-date arithmetic is Howard Hinnant's `days_from_civil`.

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(MS_PER_DAY), ms.rem_euclid(MS_PER_DAY));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// `--since` in ms since the Unix epoch: a duration ago (`90s`, `15m`,
/// `2h`, `7d`), a Unix time in ms, or an RFC 3339 time
/// (`2025-01-31T08:00:00Z`, with an offset or fraction, or a date alone,
/// taken as midnight UTC).
///
/// # Errors
/// A text none of those forms reads.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    let invalid = || {
        format!(
            "invalid time {text:?}: expected a duration ago (30s, 15m, 2h, 7d), Unix ms, or RFC 3339 (2025-01-31T08:00:00Z)"
        )
    };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| invalid());
    }
    let unit = match text.as_bytes().last() {
        Some(b's') => 1000,
        Some(b'm') => 60_000,
        Some(b'h') => 3_600_000,
        Some(b'd') => MS_PER_DAY,
        _ => 0,
    };
    // The unit is one ASCII byte, so the cut is on a character boundary.
    if unit > 0
        && let Ok(count) = text[..text.len() - 1].parse::<u32>()
    {
        return Ok(now_ms.saturating_sub(i64::from(count).saturating_mul(unit)));
    }
    rfc3339(text).ok_or_else(invalid)
}

/// `YYYY-MM-DD[THH:MM:SS[.fff](Z|±HH:MM)]` in ms since the Unix epoch.
fn rfc3339(text: &str) -> Option<i64> {
    let number = |s: &str| -> Option<i64> { s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok())? };
    let (date, time) = match text.split_once(['T', 't', ' ']) {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let mut parts = date.splitn(3, '-');
    let (year, month, day) = (number(parts.next()?)?, number(parts.next()?)?, number(parts.next()?)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || date.len() != 10 {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * MS_PER_DAY;
    let Some(time) = time else { return Some(ms) };
    let (clock, offset_ms) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (clock, offset) = time.split_at(at);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (hours, minutes) = offset[1..].split_once(':')?;
        (clock, sign * (number(hours)? * 3_600_000 + number(minutes)? * 60_000))
    };
    let (clock, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut fields = clock.splitn(3, ':');
    let (hour, minute, second) = (number(fields.next()?)?, number(fields.next()?)?, number(fields.next()?)?);
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let milli = if fraction.is_empty() { 0 } else { number(&format!("{fraction:0<3}")[..3])? };
    ms += hour * 3_600_000 + minute * 60_000 + second * 1000 + milli;
    Some(ms - offset_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_and_read_back() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(1_738_310_400_123), "2025-01-31T08:00:00.123Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [0, 1_738_310_400_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_since(&format_rfc3339(ms), 0), Ok(ms));
        }
        assert_eq!(parse_since("2025-01-31T09:30:00+01:30", 0), Ok(1_738_310_400_000));
        assert_eq!(parse_since("2025-01-31T06:00:00-02:00", 0), Ok(1_738_310_400_000));
        assert_eq!(parse_since("2025-01-31", 0), Ok(1_738_281_600_000));
    }

    #[test]
    fn since_reads_durations_and_unix_ms_and_refuses_the_rest() {
        let now = 10_000_000_000;
        assert_eq!(parse_since("90s", now), Ok(now - 90_000));
        assert_eq!(parse_since("15m", now), Ok(now - 900_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("7d", now), Ok(now - 7 * MS_PER_DAY));
        assert_eq!(parse_since("1738310400000", now), Ok(1_738_310_400_000));
        for bad in
            ["", "yesterday", "5w", "5é", "é", "2025-13-01", "2025-01-31T25:00:00Z", "2025-01-31T08:00:00", "-5m"]
        {
            let err = parse_since(bad, now).unwrap_err();
            assert!(err.contains("expected a duration ago"), "{bad:?}: {err}");
        }
    }
}
